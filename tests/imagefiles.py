"""Writers of small photo files for the input, decode, cache and check tests."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
EXIF_ORIENTATION_TAG = 0x0112


def pattern(height: int = 32, width: int = 48) -> np.ndarray:
    """Return an upright test picture: red left half, blue right half, green stripe over the top quarter.

    No rotation or mirror maps it onto itself, so every wrong EXIF handling changes it.
    """
    picture = np.zeros((height, width, 3), dtype=np.uint8)
    picture[:, : width // 2] = RED
    picture[:, width // 2 :] = BLUE
    picture[: height // 4] = GREEN
    return picture


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """Return the pixels a camera stores with EXIF `orientation` for a scene that looks like `upright`.

    Follows the EXIF 2.3 definition of tag 0x0112, where the value names the visual position of
    the stored image's row 0 and column 0. For example, 6 means row 0 is the visual right side
    and column 0 the visual top, so stored[r, c] = upright[c, width - 1 - r].
    """
    stored = {
        1: upright,  # row 0 top, column 0 left
        2: upright[:, ::-1],  # row 0 top, column 0 right
        3: upright[::-1, ::-1],  # row 0 bottom, column 0 right
        4: upright[::-1, :],  # row 0 bottom, column 0 left
        5: upright.transpose(1, 0, 2),  # row 0 left, column 0 top
        6: upright[:, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 top
        7: upright[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
        8: upright[::-1, :].transpose(1, 0, 2),  # row 0 left, column 0 bottom
    }[orientation]
    return np.ascontiguousarray(stored)


def write_image(path: str | bytes, pixels: np.ndarray | Image.Image, *, orientation: int | None = None, **save_options) -> str:
    """Save pixels with Pillow (format from the extension unless given) and return the path as str."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        save_options["exif"] = exif.tobytes()
    path = os.fsdecode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    extension = os.path.splitext(path)[1].lower()
    if extension in (".heic", ".heif"):
        save_options.setdefault("format", "HEIF")
    elif extension in (".jpg", ".jpeg", ".jpe"):
        save_options.setdefault("format", "JPEG")
        save_options.setdefault("quality", 95)
    image.save(path, **save_options)
    return path


def write_solid(path: str | bytes, color=(90, 140, 200), size=(24, 16), **save_options) -> str:
    """Save a single-colour RGB image and return its path."""
    return write_image(path, Image.new("RGB", size, color), **save_options)


def write_png_header_only(path: str, width: int, height: int) -> str:
    """Write a PNG whose header declares width x height but contains no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def region_colors(pixels: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """Return the colours at the centres of the pattern's green stripe, lower-left and lower-right regions."""
    height, width = pixels.shape[:2]
    return {
        "top": tuple(int(v) for v in pixels[height // 8, width // 2]),
        "lower_left": tuple(int(v) for v in pixels[height * 5 // 8, width // 4]),
        "lower_right": tuple(int(v) for v in pixels[height * 5 // 8, width * 3 // 4]),
    }


def assert_color_close(actual, expected, tolerance: int = 40) -> None:
    difference = np.abs(np.asarray(actual, dtype=int) - np.asarray(expected, dtype=int)).max()
    assert difference <= tolerance, f"colour {actual} differs from {expected} by {difference}"
