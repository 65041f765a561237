"""Tests for the assign and evaluate steps on a tiny trained model."""

import csv
import json
import os

import numpy as np
import pytest

from ihcc import assign
from ihcc import evaluate
from ihcc import train

from conftest import tiny_config


def test_environment_types_merge_similar_centroids():
    # Environments a/* and b/* point the same way in pairs: (a/0, b/0) and (a/1, b/1).
    environments = np.asarray(["a/0", "a/0", "a/1", "b/0", "b/1", "b/1", "b/1"], dtype=object)
    features = np.asarray(
        [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.9, 0.3, 0], [0, 0.9, 0.3], [0.1, 1, 0], [0, 1, 0]],
        dtype=np.float32,
    )
    features /= np.linalg.norm(features, axis=1, keepdims=True)

    merged = assign.environment_types(environments, features, threshold=0.72)
    assert merged["a/0"] == merged["b/0"]
    assert merged["a/1"] == merged["b/1"]
    assert merged["a/0"] != merged["a/1"]
    # type_000 is the type with the most images: a/1 + b/1 hold 4 of the 7.
    assert merged["a/1"] == "type_000"

    separate = assign.environment_types(environments, features, threshold=0.999)
    assert len(set(separate.values())) == 4


def test_environment_types_single_environment():
    environments = np.asarray(["p/0", "p/0"], dtype=object)
    features = np.eye(2, dtype=np.float32)
    assert assign.environment_types(environments, features, 0.72) == {"p/0": "type_000"}


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir with a checkpoint of the tiny config trained on its generated cohort."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train(tiny_config(), workdir)
    return workdir


def read_rows(workdir, config=None):
    out_dir = assign.assign_dir(workdir, config or tiny_config())
    with open(os.path.join(out_dir, "assignments.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_assign_training_data_writes_consistent_hierarchy(trained_workdir):
    config = tiny_config()
    summary = assign.assign(config, trained_workdir)
    header, rows = read_rows(trained_workdir)

    assert tuple(header) == assign.ASSIGNMENT_COLUMNS
    assert len(rows) == 3 * 2 * 4
    assert all(r["status"] == "labelled" for r in rows)

    owner = {}
    for row in rows:
        assert row["environment"].startswith(row["participant"] + "/")
        owner.setdefault(row["environment"], row["participant"])
        assert owner[row["environment"]] == row["participant"]
        assert 0 <= int(row["cluster"]) < config.model.class_num
        assert 0.0 < float(row["cluster_probability"]) <= 1.0
        assert row["true_environment"] and row["true_environment_type"]

    type_of = {}
    for row in rows:
        type_of.setdefault(row["environment"], row["environment_type"])
        assert type_of[row["environment"]] == row["environment_type"]

    assert summary["images_labelled"] == len(rows)
    assert summary["images_skipped"] == 0
    assert summary["participants"] == 3
    assert summary["environments"] == len(owner)
    assert summary["environment_types"] == len(set(type_of.values()))
    assert sum(summary["environments_per_participant"].values()) == len(owner)
    with open(os.path.join(trained_workdir, "assign", "summary.json")) as f:
        assert json.load(f) == summary
    with np.load(
        os.path.join(trained_workdir, "assign", "features.npz"), allow_pickle=False
    ) as saved:
        assert sorted(saved.files) == ["features", "paths", "probs"]
        assert sorted(saved["paths"].tolist()) == sorted(r["path"] for r in rows)
        assert saved["probs"].shape == (len(rows), config.model.class_num)

    report = evaluate.evaluate(config, trained_workdir)
    assert report["environments_true"] == 6
    assert report["types_true"] == 2
    assert report["environments_found"] == len(owner)
    for scores in [report["environment"], *report["baselines"].values()]:
        for key in ("nmi", "ari", "within_participant_nmi", "within_participant_ari"):
            assert -1.0 <= scores[key] <= 1.0, (key, scores)
    trivial = report["baselines"]["one_environment_per_participant"]
    assert trivial["within_participant_nmi"] == 0.0
    assert os.path.exists(os.path.join(trained_workdir, "assign", "evaluation.json"))


def test_assign_new_folder_reports_unreadable_file(trained_workdir, tmp_path):
    config = tiny_config()
    source = os.path.join(trained_workdir, "synthetic", "images")
    # A new participant laid out as ROOT/<participant>/<environment>/<image>, plus a broken file.
    new_root = tmp_path / "photos"
    for participant in sorted(os.listdir(source))[:1]:
        for environment in sorted(os.listdir(os.path.join(source, participant))):
            target = new_root / "newcomer" / environment
            target.mkdir(parents=True)
            for name in sorted(os.listdir(os.path.join(source, participant, environment))):
                with open(os.path.join(source, participant, environment, name), "rb") as f:
                    (target / name).write_bytes(f.read())
    broken = new_root / "newcomer" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")

    config.assign.root = str(new_root)
    summary = assign.assign(config, trained_workdir)
    _, rows = read_rows(trained_workdir, config)

    assert assign.assign_dir(trained_workdir, config) != os.path.join(trained_workdir, "assign")
    assert len(rows) == 2 * 4 + 1
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [r["path"] for r in skipped] == [str(broken)]
    assert skipped[0]["reason"]
    assert skipped[0]["participant"] == "newcomer"
    labelled = [r for r in rows if r["status"] == "labelled"]
    assert {r["participant"] for r in labelled} == {"newcomer"}
    assert summary["images_skipped"] == 1
    assert summary["participants"] == 1


def test_assign_without_checkpoint_raises(tmp_path):
    config = tiny_config()
    with pytest.raises(FileNotFoundError, match="mode=train"):
        assign.assign(config, str(tmp_path))


def test_evaluate_without_known_labels_raises(tmp_path):
    out_dir = tmp_path / "assign"
    out_dir.mkdir()
    with open(out_dir / "assignments.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=assign.ASSIGNMENT_COLUMNS)
        writer.writeheader()
        writer.writerow(
            {
                **{c: "" for c in assign.ASSIGNMENT_COLUMNS},
                "path": "/x.png",
                "participant": "p",
                "status": "labelled",
                "environment": "p/c000",
            }
        )
    with pytest.raises(ValueError, match="known environment"):
        evaluate.evaluate(tiny_config(), str(tmp_path))
