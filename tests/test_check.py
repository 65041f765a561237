"""Tests for ihcc.check: the data report and its exit code."""

import os
import shutil

import imagefiles
from ihcc.check import EXIT_INPUT_ERROR, EXIT_NO_USABLE_IMAGE, EXIT_OK, check_inputs


def make_mixed_study(root):
    """Two participants with JPEG, PNG and HEIC photos, one rotated, one copy, one broken and one text file."""
    upright = imagefiles.pattern(32, 48)
    imagefiles.write_image(root / "p01" / "kitchen" / "a.jpg", upright)
    imagefiles.write_image(root / "p01" / "kitchen" / "b.jpg", imagefiles.stored_for_orientation(upright, 6), orientation=6)
    imagefiles.write_image(root / "p01" / "car" / "c.png", imagefiles.pattern(60, 40))
    imagefiles.write_image(root / "p02" / "d.heic", imagefiles.stored_for_orientation(upright, 3), orientation=3)
    shutil.copy(root / "p01" / "kitchen" / "a.jpg", root / "p02" / "copy.jpg")
    (root / "p02" / "broken.jpg").write_bytes(b"")
    (root / "p02" / "notes.txt").write_text("diary")


def test_report_contents(tmp_path):
    make_mixed_study(tmp_path)

    report = check_inputs(str(tmp_path), "", 16)

    assert report.exit_code == EXIT_OK
    assert report.input_error is None
    assert report.participants == ["p01", "p02"]
    assert report.images_per_participant == {"p01": 3, "p02": 2}
    assert report.usable_images == 5
    assert report.formats == {"JPEG": 3, "PNG": 1, "HEIF": 1}
    assert report.orientation_fixes == 2
    assert sorted(report.widths) == [40, 48, 48, 48, 48]
    assert sorted(report.heights) == [32, 32, 32, 32, 60]
    assert report.environments == 2
    assert [os.path.basename(entry.path) for entry in report.skipped] == ["broken.jpg", "notes.txt"]
    assert "empty (0 bytes)" in report.skipped[0].reason
    assert "Not an image file" in report.skipped[1].reason
    assert report.duplicate_groups == [[str(tmp_path / "p01" / "kitchen" / "a.jpg"), str(tmp_path / "p02" / "copy.jpg")]]


def test_report_text(tmp_path):
    make_mixed_study(tmp_path)

    text = check_inputs(str(tmp_path), "", 16).format()

    assert f"folder {tmp_path}" in text
    assert "Participants:    2" in text
    assert "Usable images:   5" in text
    assert "Images per participant: min 2, median 2.5, max 3" in text
    assert "Image width (pixels):  min 40, median 48, max 48" in text
    assert "Formats: HEIF 1, JPEG 3, PNG 1" in text
    assert "EXIF orientation applied: 2 images" in text
    assert "Identical files (same bytes, all kept): 1 groups" in text
    assert f"  {os.path.join('p02', 'broken.jpg')}: " in text
    assert f"  {os.path.join('p01', 'kitchen', 'a.jpg')}, {os.path.join('p02', 'copy.jpg')}" in text
    assert text.rstrip().endswith("Result: OK, 5 images from 2 participants are usable.")


def test_no_usable_image_fails(tmp_path):
    (tmp_path / "p01").mkdir()
    (tmp_path / "p01" / "a.jpg").write_text("not a photo")
    (tmp_path / "p01" / "b.png").write_bytes(b"")

    report = check_inputs(str(tmp_path), "", 16)

    assert report.usable_images == 0
    assert report.exit_code == EXIT_NO_USABLE_IMAGE
    assert len(report.skipped) == 2
    assert "no image that decodes" in report.warnings[-1]
    assert "Result: FAILED, no usable image remains" in report.format()


def test_malformed_manifest_fails(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,group\na.jpg,p01\n")

    report = check_inputs("", str(manifest), 16)

    assert report.exit_code == EXIT_INPUT_ERROR
    assert "no column 'participant'" in report.input_error
    text = report.format()
    assert f"manifest {manifest}" in text
    assert "no column 'participant'" in text
    assert "Result: FAILED (malformed input)." in text


def test_manifest_report_with_skipped_row(tmp_path):
    imagefiles.write_solid(tmp_path / "images" / "a.jpg")
    imagefiles.write_solid(tmp_path / "images" / "b.jpg", color=(1, 1, 1))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,participant,environment,environment_type\na.jpg,p01,home,home\nb.jpg,p01,work,office\nc.jpg,p02,car,car\n")

    report = check_inputs(str(tmp_path / "images"), str(manifest), 16)

    assert report.exit_code == EXIT_OK
    assert report.images_per_participant == {"p01": 2}
    assert report.environment_types == 2
    assert report.skipped[0].reason.startswith("Row 4: File not found")
    assert "has only one image" not in "".join(report.warnings)
