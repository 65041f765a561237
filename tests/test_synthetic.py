"""Tests for the synthetic cohort generator ihcc.synthetic."""

import csv
import json
import os
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from ihcc import synthetic

SMALL = dict(num_participants=4, num_types=3, envs_per_participant=3, photos_per_env=4,
             image_size=24, seed=5)
# Large enough to hold a same-type pair of environments in some participant.
SEPARABLE = dict(num_participants=6, num_types=4, envs_per_participant=4, photos_per_env=12,
                 image_size=32, seed=1)


def _read_rows(manifest):
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def _file_bytes(root):
    contents = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            contents[os.path.relpath(path, root)] = open(path, "rb").read()
    return contents


def _file_mtimes(root):
    return {
        os.path.join(folder, name): os.stat(os.path.join(folder, name)).st_mtime_ns
        for folder, _, files in os.walk(root)
        for name in files
    }


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("small"))
    return out, synthetic.make_cohort(out, **SMALL)


@pytest.fixture(scope="module")
def separable_cohort(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("separable"))
    return out, synthetic.make_cohort(out, **SEPARABLE)


def test_manifest_schema_and_counts(small_cohort):
    out, manifest = small_cohort
    assert manifest == os.path.join(out, "labels.csv")
    header, rows = _read_rows(manifest)
    assert header == ["path", "participant", "environment", "environment_type"]
    assert len(rows) == 4 * 3 * 4
    assert {r["participant"] for r in rows} == {"p00", "p01", "p02", "p03"}
    assert len({r["environment"] for r in rows}) == 4 * 3
    assert {r["environment_type"] for r in rows} == {"type00", "type01", "type02"}

    photos = defaultdict(int)
    for row in rows:
        photos[row["environment"]] += 1
        participant, environment, name = row["path"].split("/")
        assert participant == row["participant"]
        assert environment == row["environment"]
        assert environment.endswith("_" + row["environment_type"])
        image = Image.open(os.path.join(out, "images", row["path"]))
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (24, 24)
    assert set(photos.values()) == {4}


def test_images_match_manifest(small_cohort):
    out, manifest = small_cohort
    _, rows = _read_rows(manifest)
    on_disk = set(_file_bytes(os.path.join(out, "images")))
    assert on_disk == {r["path"] for r in rows}


def test_environment_has_one_participant(small_cohort):
    _, rows = _read_rows(small_cohort[1])
    owners = defaultdict(set)
    types = defaultdict(set)
    for row in rows:
        owners[row["environment"]].add(row["participant"])
        types[row["environment"]].add(row["environment_type"])
    assert all(len(v) == 1 for v in owners.values())
    assert all(len(v) == 1 for v in types.values())


@pytest.mark.parametrize("config", [SMALL, SEPARABLE])
def test_every_type_has_two_participants(config):
    assignment = synthetic._assign_types(
        config["num_participants"], config["num_types"], config["envs_per_participant"],
        np.random.default_rng([config["seed"], 3]),
    )
    assert all(len(types) == config["envs_per_participant"] for types in assignment)
    for t in range(config["num_types"]):
        owners = sum(t in types for types in assignment)
        assert owners >= 2, f"type {t} has {owners} participant(s)"


def test_type_assignment_many_seeds():
    duplicates = 0
    for seed in range(30):
        assignment = synthetic._assign_types(8, 6, 4, np.random.default_rng(seed))
        for t in range(6):
            assert sum(t in types for types in assignment) >= 2
        duplicates += sum(len(set(types)) < len(types) for types in assignment)
    # Same-type pairs happen but are not the norm.
    assert 0 < duplicates < 30 * 8 / 2


def test_manifest_types_have_two_participants(separable_cohort):
    _, rows = _read_rows(separable_cohort[1])
    participants = defaultdict(set)
    for row in rows:
        participants[row["environment_type"]].add(row["participant"])
    assert len(participants) == 4
    assert all(len(p) >= 2 for p in participants.values())


def test_same_seed_same_bytes(small_cohort, tmp_path):
    out, _ = small_cohort
    again = tmp_path / "again"
    synthetic.make_cohort(str(again), **SMALL)
    first = _file_bytes(os.path.join(out, "images"))
    second = _file_bytes(str(again / "images"))
    assert first == second
    assert open(os.path.join(out, "labels.csv"), "rb").read() == (again / "labels.csv").read_bytes()


def test_other_seed_other_images(small_cohort, tmp_path):
    out, _ = small_cohort
    other = tmp_path / "other"
    synthetic.make_cohort(str(other), **{**SMALL, "seed": 6})
    first = _file_bytes(os.path.join(out, "images"))
    second = _file_bytes(str(other / "images"))
    shared = set(first) & set(second)
    assert sum(first[k] == second[k] for k in shared) == 0


def test_second_call_writes_nothing(tmp_path):
    config = {**SMALL, "photos_per_env": 2}
    manifest = synthetic.make_cohort(str(tmp_path), **config)
    before = _file_mtimes(str(tmp_path))
    assert synthetic.make_cohort(str(tmp_path), **config) == manifest
    assert _file_mtimes(str(tmp_path)) == before
    marker = json.loads((tmp_path / synthetic.MARKER_NAME).read_text())
    assert marker["photos_per_env"] == 2
    assert marker["seed"] == SMALL["seed"]


def test_new_arguments_regenerate(tmp_path):
    synthetic.make_cohort(str(tmp_path), **{**SMALL, "photos_per_env": 3})
    manifest = synthetic.make_cohort(str(tmp_path), **{**SMALL, "photos_per_env": 2})
    _, rows = _read_rows(manifest)
    assert len(rows) == 4 * 3 * 2
    names = {os.path.basename(p) for p in _file_bytes(str(tmp_path / "images"))}
    assert names == {"0.png", "1.png"}


def test_interrupted_run_regenerates(tmp_path, monkeypatch):
    config = {**SMALL, "photos_per_env": 2}
    real_take_photo = synthetic._take_photo
    calls = []

    def failing_take_photo(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_take_photo(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_take_photo", failing_take_photo)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_cohort(str(tmp_path), **config)
    assert not (tmp_path / synthetic.MARKER_NAME).exists()

    monkeypatch.setattr(synthetic, "_take_photo", real_take_photo)
    manifest = synthetic.make_cohort(str(tmp_path), **config)
    _, rows = _read_rows(manifest)
    assert len(rows) == 4 * 3 * 2
    assert (tmp_path / synthetic.MARKER_NAME).exists()
    assert not (tmp_path / synthetic.PARTIAL_MARKER_NAME).exists()
    assert not (tmp_path / synthetic.STAGING_DIR).exists()


def test_foreign_folder_rejected(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"not generated")
    with pytest.raises(FileExistsError, match="did not write"):
        synthetic.make_cohort(str(tmp_path), **SMALL)
    assert (tmp_path / "images" / "mine.png").read_bytes() == b"not generated"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_types": 13}, "exceeds"),
        ({"photos_per_env": 0}, "positive integer"),
        ({"image_size": 8}, "at least 16"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_invalid_arguments(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        synthetic.make_cohort(str(tmp_path), **{**SMALL, **change})


def _nearest_centroid_accuracy(features, environments, photo_numbers):
    """Fit centroids on even photos, classify odd photos, return the accuracy."""
    train = photo_numbers % 2 == 0
    names = np.unique(environments)
    centroids = np.stack([features[train & (environments == e)].mean(0) for e in names])
    test = ~train
    distances = ((features[test][:, None] - centroids[None]) ** 2).sum(-1)
    return float((names[distances.argmin(1)] == environments[test]).mean())


def test_environments_separable_within_participant(separable_cohort):
    out, manifest = separable_cohort
    _, rows = _read_rows(manifest)
    features = np.stack([
        np.asarray(Image.open(os.path.join(out, "images", r["path"])).resize((8, 8), Image.BILINEAR),
                   dtype=np.float32).ravel() / 255.0
        for r in rows
    ])
    participants = np.array([r["participant"] for r in rows])
    environments = np.array([r["environment"] for r in rows])
    photo_numbers = np.array([int(os.path.splitext(os.path.basename(r["path"]))[0]) for r in rows])

    chance = 1 / SEPARABLE["envs_per_participant"]
    accuracies = {}
    for participant in np.unique(participants):
        members = participants == participant
        accuracies[participant] = _nearest_centroid_accuracy(
            features[members], environments[members], photo_numbers[members])
    assert np.mean(list(accuracies.values())) >= 0.8, accuracies
    assert min(accuracies.values()) >= 2 * chance, accuracies


def test_same_type_environments_separable(separable_cohort):
    # Two environments of one type in one participant share the type's structure but
    # must still differ in their own details.
    out, manifest = separable_cohort
    _, rows = _read_rows(manifest)
    by_owner_type = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_owner_type[(row["participant"], row["environment_type"])][row["environment"]].append(row)
    pairs = [envs for envs in by_owner_type.values() if len(envs) == 2]
    assert pairs, "the SEPARABLE cohort should contain a same-type pair"

    accuracies = {}
    for envs in pairs:
        pair_rows = [row for env_rows in envs.values() for row in env_rows]
        features = np.stack([
            np.asarray(Image.open(os.path.join(out, "images", r["path"])).resize((8, 8), Image.BILINEAR),
                       dtype=np.float32).ravel() / 255.0
            for r in pair_rows
        ])
        environments = np.array([r["environment"] for r in pair_rows])
        photo_numbers = np.array([int(os.path.splitext(os.path.basename(r["path"]))[0]) for r in pair_rows])
        accuracies[tuple(sorted(envs))] = _nearest_centroid_accuracy(
            features, environments, photo_numbers)
    # Chance is 0.5 for a pair.
    assert np.mean(list(accuracies.values())) >= 0.7, accuracies
    assert min(accuracies.values()) > 0.5, accuracies
