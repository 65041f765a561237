"""Tests for ihcc.decode on image files written by the tests."""

import os

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import imagefiles
from ihcc import decode
from ihcc.decode import ImageReadError, decode_image, read_image
from imagefiles import BLUE, GREEN, RED


def assert_upright_pattern(pixels):
    colors = imagefiles.region_colors(pixels)
    imagefiles.assert_color_close(colors["top"], GREEN)
    imagefiles.assert_color_close(colors["lower_left"], RED)
    imagefiles.assert_color_close(colors["lower_right"], BLUE)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation(tmp_path, orientation):
    stored = imagefiles.stored_for_orientation(imagefiles.pattern(), orientation)
    path = imagefiles.write_image(tmp_path / f"o{orientation}.jpg", stored, orientation=orientation)

    result = read_image(path, 32)

    assert result.orientation == orientation
    assert (result.width, result.height) == (48, 32)
    assert result.format == "JPEG"
    assert_upright_pattern(result.pixels)


def test_png_exif_orientation(tmp_path):
    stored = imagefiles.stored_for_orientation(imagefiles.pattern(), 8)
    path = imagefiles.write_image(tmp_path / "o8.png", stored, orientation=8)

    result = read_image(path, 32)

    assert result.orientation == 8
    assert_upright_pattern(result.pixels)


def test_missing_orientation_is_one(tmp_path):
    path = imagefiles.write_image(tmp_path / "plain.jpg", imagefiles.pattern())

    result = read_image(path, 32)

    assert result.orientation == 1
    assert_upright_pattern(result.pixels)


@pytest.mark.parametrize("extension", [".heic", ".HEIF"])
@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_heic_orientation(tmp_path, extension, orientation):
    stored = imagefiles.stored_for_orientation(imagefiles.pattern(), orientation)
    path = imagefiles.write_image(tmp_path / f"o{orientation}{extension}", stored, orientation=orientation)

    result = read_image(path, 32)

    assert result.format == "HEIF"
    assert result.orientation == orientation
    assert (result.width, result.height) == (48, 32)
    assert_upright_pattern(result.pixels)


def test_output_shape_and_dtype(tmp_path):
    path = imagefiles.write_solid(tmp_path / "wide.png", color=(10, 20, 30), size=(90, 20))

    pixels = decode_image(path, 17)

    assert pixels.shape == (17, 17, 3)
    assert pixels.dtype == np.uint8
    assert np.all(pixels == (10, 20, 30))


def test_resize_is_antialiased(tmp_path):
    # A one-pixel checkerboard shrunk 16 times must average to grey, not alias to black or white.
    checkerboard = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    path = imagefiles.write_image(tmp_path / "checker.png", np.stack([checkerboard] * 3, axis=-1))

    pixels = decode_image(path, 16)

    assert abs(float(pixels.mean()) - 127.5) < 3
    assert int(pixels.max()) - int(pixels.min()) < 10


def test_palette_png(tmp_path):
    image = Image.new("RGB", (20, 20), (200, 30, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    path = imagefiles.write_image(tmp_path / "palette.png", image)
    assert Image.open(path).mode == "P"

    pixels = decode_image(path, 8)

    imagefiles.assert_color_close(pixels[4, 4], (200, 30, 60), tolerance=2)


def test_palette_png_transparency_on_white(tmp_path):
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0] * 256)
    path = imagefiles.write_image(tmp_path / "palette_transparent.png", image, transparency=0)

    pixels = decode_image(path, 8)

    assert np.all(pixels == 255)


def test_grey_png(tmp_path):
    path = imagefiles.write_image(tmp_path / "grey.png", Image.new("L", (20, 20), 77))

    pixels = decode_image(path, 8)

    assert np.all(pixels == 77)


def test_grey_alpha_png_on_white(tmp_path):
    path = imagefiles.write_image(tmp_path / "grey_alpha.png", Image.new("LA", (20, 20), (0, 0)))
    assert Image.open(path).mode == "LA"

    pixels = decode_image(path, 8)

    assert np.all(pixels == 255)


def test_rgba_png_half_transparent_on_white(tmp_path):
    path = imagefiles.write_image(tmp_path / "rgba.png", Image.new("RGBA", (20, 20), (255, 0, 0, 128)))

    pixels = decode_image(path, 8)

    # 128/255 red over white: green and blue become 255 * (1 - 128/255) = 127.
    imagefiles.assert_color_close(pixels[4, 4], (255, 127, 127), tolerance=1)


def test_16_bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0).repeat(4, axis=1)
    path = imagefiles.write_image(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I;16")

    pixels = decode_image(path, 16)

    # Each value v maps to round(v * 255 / 65535); clipping would turn 1000 and 32896 into 255.
    assert pixels[:, :4].max() == 0
    assert pixels[0, 6].tolist() == [4, 4, 4]
    assert pixels[0, 10].tolist() == [128, 128, 128]
    assert pixels[0, 14].tolist() == [255, 255, 255]


def test_cmyk_jpeg(tmp_path):
    # Cyan ink absent, magenta and yellow full: red.
    path = imagefiles.write_image(tmp_path / "cmyk.jpg", Image.new("CMYK", (24, 24), (0, 255, 255, 0)))
    assert Image.open(path).mode == "CMYK"

    pixels = decode_image(path, 8)

    imagefiles.assert_color_close(pixels[4, 4], RED, tolerance=10)


def test_progressive_jpeg(tmp_path):
    path = imagefiles.write_image(tmp_path / "progressive.jpg", imagefiles.pattern(), progressive=True)
    assert Image.open(path).info.get("progressive")

    assert_upright_pattern(decode_image(path, 32))


@pytest.mark.parametrize("lossless", [False, True])
def test_webp(tmp_path, lossless):
    path = imagefiles.write_image(tmp_path / "photo.webp", imagefiles.pattern(), lossless=lossless)

    result = read_image(path, 32)

    assert result.format == "WEBP"
    assert_upright_pattern(result.pixels)


def test_large_jpeg_decoded_at_reduced_scale(tmp_path, monkeypatch):
    big = np.kron(imagefiles.pattern(32, 48), np.ones((100, 100, 1), dtype=np.uint8))  # 4800 x 3200
    path = imagefiles.write_image(tmp_path / "big.jpg", big, quality=80)
    draft_scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original_draft(self, mode, size)
        draft_scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)

    result = read_image(path, 64)

    assert draft_scales == [8]
    assert (result.width, result.height) == (4800, 3200)
    assert_upright_pattern(result.pixels)


def test_decompression_bomb_rejected(tmp_path):
    path = imagefiles.write_png_header_only(str(tmp_path / "bomb.png"), 30000, 30000)

    with pytest.raises(ImageReadError, match="too large"):
        decode_image(path, 8)


def test_pixel_limit_checked_without_pillow(tmp_path, monkeypatch):
    path = imagefiles.write_solid(tmp_path / "photo.jpg", size=(100, 100))
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 5000)

    with pytest.raises(ImageReadError, match=r"10,000 pixels, more than the limit of 5,000"):
        decode_image(path, 8)


def test_truncated_jpeg(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    path = imagefiles.write_image(tmp_path / "full.jpg", noise)
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageReadError, match="truncated or damaged.*Copy it again"):
        decode_image(str(truncated), 8)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")

    with pytest.raises(ImageReadError, match=r"empty \(0 bytes\).*Copy it again"):
        decode_image(str(path), 8)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n")

    with pytest.raises(ImageReadError, match="not a readable JPEG.*remove it"):
        decode_image(str(path), 8)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="File not found"):
        decode_image(str(tmp_path / "gone.jpg"), 8)


def test_undecodable_file_name(tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    path = imagefiles.write_image(path, imagefiles.pattern())

    assert_upright_pattern(decode_image(path, 32))


def test_invalid_size_rejected(tmp_path):
    path = imagefiles.write_solid(tmp_path / "photo.png")

    with pytest.raises(ValueError, match="positive"):
        decode_image(path, 0)
