"""Tests for ihcc.inputs: folder and manifest discovery, rejected files and input errors."""

import os
import shutil

import pytest

import imagefiles
from ihcc import inputs
from ihcc.decode import decode_image
from ihcc.inputs import InputError, Record, discover, find_duplicate_images

IE_TOWER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "ie-tower")


def skipped_by_name(inventory):
    return {os.path.basename(entry.path): entry.reason for entry in inventory.skipped}


def record_names(inventory):
    return [os.path.basename(record.path) for record in inventory.records]


# ----------------------------------------------------------------------------- folder mode


def test_folder_participants_and_environments(tmp_path):
    imagefiles.write_solid(tmp_path / "p02" / "b.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "kitchen" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "kitchen" / "morning" / "c.png")
    imagefiles.write_solid(tmp_path / "p01" / "d.png")

    inventory = discover(root=str(tmp_path))

    root = str(tmp_path)
    assert inventory.records == [
        Record(os.path.join(root, "p01", "d.png"), "p01", None),
        Record(os.path.join(root, "p01", "kitchen", "a.jpg"), "p01", "kitchen"),
        Record(os.path.join(root, "p01", "kitchen", "morning", "c.png"), "p01", "kitchen"),
        Record(os.path.join(root, "p02", "b.jpg"), "p02", None),
    ]
    assert inventory.skipped == []


def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    imagefiles.write_solid(tmp_path / "data" / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "data" / "p01" / "b.jpg")
    monkeypatch.chdir(tmp_path)

    inventory = discover(root="data")

    assert all(os.path.isabs(record.path) for record in inventory.records)


def test_extensions_in_any_case(tmp_path):
    names = ["a.JPG", "b.Jpeg", "c.jpeg", "d.PNG", "e.heic", "f.HEIF", "g.WebP", "h.webp"]
    for name in names:
        imagefiles.write_solid(tmp_path / "p01" / name)

    inventory = discover(root=str(tmp_path))

    assert record_names(inventory) == names
    assert inventory.skipped == []


def test_hidden_and_system_files_ignored(tmp_path):
    imagefiles.write_solid(tmp_path / "p01" / "photo.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "second.jpg")
    for name in [".DS_Store", "._photo.jpg", "Thumbs.db", "desktop.ini", ".hidden.jpg"]:
        (tmp_path / "p01" / name).write_bytes(b"\x00\x05\x16\x07")
    imagefiles.write_solid(tmp_path / "p01" / "__MACOSX" / "x.jpg")
    imagefiles.write_solid(tmp_path / "p01" / ".thumbnails" / "y.jpg")
    imagefiles.write_solid(tmp_path / ".Trashes" / "z.jpg")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")

    inventory = discover(root=str(tmp_path))

    assert record_names(inventory) == ["photo.jpg", "second.jpg"]
    assert inventory.skipped == []


def test_non_image_file_skipped_with_reason(tmp_path):
    imagefiles.write_solid(tmp_path / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "b.jpg")
    (tmp_path / "p01" / "notes.txt").write_text("diary")
    (tmp_path / "p01" / "clip.mov").write_bytes(b"\x00" * 10)

    inventory = discover(root=str(tmp_path))

    assert record_names(inventory) == ["a.jpg", "b.jpg"]
    reasons = skipped_by_name(inventory)
    assert set(reasons) == {"notes.txt", "clip.mov"}
    assert "Not an image file (extension '.txt')" in reasons["notes.txt"]
    assert "JPEG, PNG, HEIC/HEIF and WebP" in reasons["clip.mov"]


def test_image_directly_under_root_skipped(tmp_path):
    imagefiles.write_solid(tmp_path / "loose.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "b.jpg")

    inventory = discover(root=str(tmp_path))

    assert record_names(inventory) == ["a.jpg", "b.jpg"]
    assert "no participant" in skipped_by_name(inventory)["loose.jpg"]


def test_undecodable_file_name(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"p\xff01")
    imagefiles.write_image(os.path.join(folder, b"caf\xe9.jpg"), imagefiles.pattern())
    imagefiles.write_image(os.path.join(folder, b"plain.jpg"), imagefiles.pattern())

    inventory = discover(root=str(tmp_path))

    record = inventory.records[0]
    assert os.fsencode(record.path) == os.path.join(folder, b"caf\xe9.jpg")
    assert os.fsencode(record.participant) == b"p\xff01"
    assert inputs.display_path(record.path).endswith("caf\\xe9.jpg")
    assert decode_image(record.path, 8).shape == (8, 8, 3)


def test_broken_and_looping_symlinks_skipped(tmp_path):
    imagefiles.write_solid(tmp_path / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "b.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "p01" / "broken.jpg")
    os.symlink(tmp_path / "p01" / "self.jpg", tmp_path / "p01" / "self.jpg")
    os.symlink(tmp_path / "p01", tmp_path / "p01" / "back")
    os.symlink(tmp_path / "p01" / "a.jpg", tmp_path / "p01" / "alias.jpg")

    inventory = discover(root=str(tmp_path))

    assert record_names(inventory) == ["a.jpg", "alias.jpg", "b.jpg"]
    reasons = skipped_by_name(inventory)
    assert set(reasons) == {"broken.jpg", "self.jpg", "back"}
    assert "Broken symbolic link" in reasons["broken.jpg"]
    assert "cannot be followed" in reasons["self.jpg"]
    assert "symbolic link loop" in reasons["back"]


def test_permission_denied_skipped(tmp_path, monkeypatch):
    imagefiles.write_solid(tmp_path / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "b.jpg")
    locked = imagefiles.write_solid(tmp_path / "p01" / "locked.jpg")
    os.chmod(locked, 0)
    if os.geteuid() == 0:
        # root reads files whatever their mode, so the denial is simulated at the open call.
        original_open = inputs._open_binary

        def denying_open(path):
            if path == locked:
                raise PermissionError(13, "Permission denied", path)
            return original_open(path)

        monkeypatch.setattr(inputs, "_open_binary", denying_open)

    inventory = discover(root=str(tmp_path))

    assert record_names(inventory) == ["a.jpg", "b.jpg"]
    assert "Permission denied" in skipped_by_name(inventory)["locked.jpg"]


def test_empty_participant_folder_raises(tmp_path):
    imagefiles.write_solid(tmp_path / "p01" / "a.jpg")
    (tmp_path / "p02").mkdir()
    (tmp_path / "p03").mkdir()
    (tmp_path / "p03" / "readme.txt").write_text("no photos yet")

    with pytest.raises(InputError, match="without any readable image") as raised:
        discover(root=str(tmp_path))

    assert os.path.join(str(tmp_path), "p02") in str(raised.value)
    assert os.path.join(str(tmp_path), "p03") in str(raised.value)


def test_no_image_at_all_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")

    with pytest.raises(InputError, match="No image file found"):
        discover(root=str(tmp_path))


def test_missing_root_raises(tmp_path):
    with pytest.raises(InputError, match="Image folder not found"):
        discover(root=str(tmp_path / "absent"))


def test_no_input_raises():
    with pytest.raises(InputError, match="No input given"):
        discover()


def test_single_image_participant_warns(tmp_path):
    imagefiles.write_solid(tmp_path / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01" / "b.jpg")
    imagefiles.write_solid(tmp_path / "p02" / "only.jpg")

    inventory = discover(root=str(tmp_path))

    assert len(inventory.warnings) == 1
    assert "'p02' has only one image" in inventory.warnings[0]


def test_participant_ids_differing_by_case_raise(tmp_path):
    imagefiles.write_solid(tmp_path / "P01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p01 " / "b.jpg")
    imagefiles.write_solid(tmp_path / "p02" / "c.jpg")

    with pytest.raises(InputError, match="differ only by letter case") as raised:
        discover(root=str(tmp_path))

    assert "'P01' and 'p01 '" in str(raised.value)
    assert "Rename" in str(raised.value)


# ----------------------------------------------------------------------------- manifest mode


def write_manifest(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_manifest_resolves_against_its_folder(tmp_path):
    imagefiles.write_solid(tmp_path / "images" / "a.jpg")
    imagefiles.write_solid(tmp_path / "images" / "b.png")
    elsewhere = imagefiles.write_solid(tmp_path / "other" / "c.jpg")
    manifest = write_manifest(
        tmp_path / "labels.csv",
        "path,participant,environment,environment_type\n"
        "images/a.jpg,p01,kitchen,kitchen\n"
        f"{elsewhere},p01,car,\n"
        "\n"
        "images/b.png,p02,,\n",
    )

    inventory = discover(manifest=manifest)

    assert inventory.records == [
        Record(str(tmp_path / "images" / "a.jpg"), "p01", "kitchen", "kitchen"),
        Record(str(tmp_path / "images" / "b.png"), "p02", None, None),
        Record(elsewhere, "p01", "car", None),
    ]


def test_manifest_resolves_against_root(tmp_path):
    imagefiles.write_solid(tmp_path / "images" / "p01" / "a.jpg")
    imagefiles.write_solid(tmp_path / "images" / "p01" / "b.jpg")
    manifest = write_manifest(tmp_path / "meta" / "labels.csv", "path,participant\np01/a.jpg,p01\np01/b.jpg,p01\n")

    inventory = discover(root=str(tmp_path / "images"), manifest=manifest)

    assert [record.path for record in inventory.records] == [
        str(tmp_path / "images" / "p01" / "a.jpg"),
        str(tmp_path / "images" / "p01" / "b.jpg"),
    ]


def test_manifest_header_with_bom_and_spaces(tmp_path):
    imagefiles.write_solid(tmp_path / "a.jpg")
    imagefiles.write_solid(tmp_path / "b.jpg")
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes("\ufeff Path , Participant \na.jpg, p01\nb.jpg,p01\n".encode("utf-8"))

    inventory = discover(manifest=str(manifest))

    assert [record.participant for record in inventory.records] == ["p01", "p01"]


def test_manifest_missing_column_raises(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", "path,environment\na.jpg,kitchen\n")

    with pytest.raises(InputError, match="no column 'participant'") as raised:
        discover(manifest=manifest)

    assert manifest in str(raised.value)


def test_manifest_duplicate_row_raises(tmp_path):
    imagefiles.write_solid(tmp_path / "a.jpg")
    imagefiles.write_solid(tmp_path / "b.jpg")
    manifest = write_manifest(tmp_path / "labels.csv", "path,participant\na.jpg,p01\nb.jpg,p01\n./a.jpg,p02\n")

    with pytest.raises(InputError, match="rows 2 and 4"):
        discover(manifest=manifest)


def test_manifest_missing_file_skipped_with_row(tmp_path):
    imagefiles.write_solid(tmp_path / "a.jpg")
    imagefiles.write_solid(tmp_path / "b.jpg")
    manifest = write_manifest(tmp_path / "labels.csv", "path,participant\na.jpg,p01\ngone.jpg,p01\nb.jpg,p01\n")

    inventory = discover(manifest=manifest)

    assert record_names(inventory) == ["a.jpg", "b.jpg"]
    assert len(inventory.skipped) == 1
    assert inventory.skipped[0].path == str(tmp_path / "gone.jpg")
    assert inventory.skipped[0].reason.startswith("Row 3: File not found")


def test_manifest_empty_participant_raises(tmp_path):
    imagefiles.write_solid(tmp_path / "a.jpg")
    manifest = write_manifest(tmp_path / "labels.csv", "path,participant\na.jpg,  \n")

    with pytest.raises(InputError, match="Row 2 .* empty 'participant'"):
        discover(manifest=manifest)


def test_manifest_participant_case_clash_raises(tmp_path):
    imagefiles.write_solid(tmp_path / "a.jpg")
    imagefiles.write_solid(tmp_path / "b.jpg")
    manifest = write_manifest(tmp_path / "labels.csv", 'path,participant\na.jpg,P01\nb.jpg,"p01 "\n')

    # Manifest values are stripped, so "p01 " reads as "p01" and clashes with "P01" by case.
    with pytest.raises(InputError, match="'P01' and 'p01'"):
        discover(manifest=manifest)


def test_manifest_not_found_raises(tmp_path):
    with pytest.raises(InputError, match="Manifest not found"):
        discover(manifest=str(tmp_path / "labels.csv"))


def test_manifest_not_utf8_raises(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes(b"path,participant\ncaf\xe9.jpg,p01\n")

    with pytest.raises(InputError, match="not valid UTF-8"):
        discover(manifest=str(manifest))


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_images_grouped_and_kept(tmp_path):
    first = imagefiles.write_solid(tmp_path / "p01" / "a.jpg", color=(1, 2, 3))
    imagefiles.write_solid(tmp_path / "p01" / "b.jpg", color=(200, 2, 3))
    shutil.copy(first, tmp_path / "p01" / "copy.jpg")
    (tmp_path / "p02").mkdir()
    shutil.copy(first, tmp_path / "p02" / "a.jpg")
    imagefiles.write_solid(tmp_path / "p02" / "other.jpg", color=(9, 9, 9))

    inventory = discover(root=str(tmp_path))
    groups = find_duplicate_images(inventory.records)

    assert len(inventory.records) == 5
    assert groups == [sorted([first, str(tmp_path / "p01" / "copy.jpg"), str(tmp_path / "p02" / "a.jpg")])]


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(IE_TOWER), reason="shared ie-tower data set not present")
def test_ie_tower_manifest():
    inventory = discover(root=os.path.join(IE_TOWER, "images"), manifest=os.path.join(IE_TOWER, "labels.csv"))

    assert len(inventory.records) == 2378
    assert len({record.participant for record in inventory.records}) == 19
    assert inventory.skipped == []
    assert all(record.environment and record.environment_type for record in inventory.records)
    for record in inventory.records[:: len(inventory.records) // 4]:
        pixels = decode_image(record.path, 32)
        assert pixels.shape == (32, 32, 3)
        assert pixels.std() > 1
