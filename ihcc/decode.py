"""Decoding of one photo file into a uint8 RGB array of a fixed square size.

Every step that makes photos from phones and cameras differ is handled here: EXIF orientation,
HEIC/HEIF files, palette, grey, 16-bit and CMYK modes, transparency and very large JPEGs.
A file that cannot be used raises ImageReadError, whose message gives the reason and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
import pillow_heif
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from ihcc.inputs import display_path

pillow_heif.register_heif_opener()

# Images with more pixels are rejected before decoding. The value equals the threshold at which
# Pillow's own Image.open raises DecompressionBombError with its default settings (2 x 89,478,485),
# and is checked here too so that a caller who disabled Pillow's check is still protected.
MAX_IMAGE_PIXELS = 178_956_970

_EXIF_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Exceptions that Pillow and pillow_heif raise for damaged or unsupported file contents.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, RuntimeError, MemoryError)


class ImageReadError(Exception):
    """A photo file that cannot be decoded; str(error) is the reason and what to do."""


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [size, size, 3]
    width: int  # width of the full-resolution image after EXIF orientation
    height: int  # height of the full-resolution image after EXIF orientation
    format: str  # Pillow format name of the file contents: JPEG, PNG, HEIF, WEBP, MPO, ...
    orientation: int  # EXIF orientation of the file, 1 to 8 (1 when absent or invalid)


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode a photo to uint8 [size, size, 3] RGB, upright and resized without keeping the aspect ratio."""
    return read_image(path, size).pixels


def read_image(path: str, size: int) -> DecodedImage:
    """Decode a photo as decode_image does and also return what was found in the file."""
    if size < 1:
        raise ValueError(f"Image size must be a positive number of pixels, got {size}.")
    printable_path = display_path(path)
    try:
        file_size = os.path.getsize(path)
    except FileNotFoundError as error:
        raise ImageReadError(f"File not found: {printable_path}. It was moved or deleted; run again to rescan the input.") from error
    except OSError as error:
        raise ImageReadError(f"Cannot read {printable_path} ({error.strerror}). Check the file and its permissions.") from error
    if file_size == 0:
        raise ImageReadError(f"{printable_path} is empty (0 bytes), usually the result of an interrupted copy. Copy it again from the source or remove it.")

    try:
        with Image.open(path) as image:
            return _decode_opened(image, printable_path, size)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{printable_path} is too large to decode safely ({error}). Downscale it below {MAX_IMAGE_PIXELS:,} pixels or remove it.") from error
    except UnidentifiedImageError as error:
        raise ImageReadError(
            f"{printable_path} is not a readable JPEG, PNG, HEIC/HEIF or WebP image, although its extension names one of these formats. "
            f"Check that it was copied completely and is really a photo, or remove it."
        ) from error
    except PermissionError as error:
        raise ImageReadError(f"Permission denied when reading {printable_path}. Make the file readable (chmod a+r) or remove it.") from error
    except _DECODE_ERRORS as error:
        raise ImageReadError(
            f"{printable_path} cannot be decoded ({type(error).__name__}: {error}); the file is truncated or damaged. "
            f"Copy it again from the source or remove it."
        ) from error


def _decode_opened(image: Image.Image, printable_path: str, size: int) -> DecodedImage:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            f"{printable_path} has {width} x {height} = {width * height:,} pixels, more than the limit of {MAX_IMAGE_PIXELS:,}. "
            f"Downscale it or remove it."
        )
    file_format = image.format or "unknown"
    # pillow_heif applies the HEIF transforms while decoding, sets the EXIF tag to 1 and keeps
    # the original value in info["original_orientation"], so HEIF images arrive upright.
    applied_by_decoder = "original_orientation" in image.info
    orientation = _read_orientation(image, printable_path)
    if orientation in (5, 6, 7, 8) and not applied_by_decoder:
        width, height = height, width

    # For JPEG, draft() makes the decoder scale by 1/2, 1/4 or 1/8 in the DCT domain while keeping
    # both sides at least `size`, so large photos decode much faster. Other formats ignore it.
    image.draft(None, (size, size))
    image.load()
    if orientation != 1 and not applied_by_decoder:
        image = ImageOps.exif_transpose(image)

    rgb = _to_rgb(image)
    # Bilinear resampling in Pillow widens its filter when shrinking, so the result is antialiased.
    resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.uint8)
    return DecodedImage(pixels=pixels, width=width, height=height, format=file_format, orientation=orientation)


def _read_orientation(image: Image.Image, printable_path: str) -> int:
    """Return the EXIF orientation of the file, 1 to 8, including one that pillow_heif already applied."""
    orientation = image.info.get("original_orientation")
    if orientation is None:
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except _DECODE_ERRORS as error:
            logging.warning("Ignoring unreadable EXIF data in %s (%s); the image is used as stored.", printable_path, error)
            return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited over white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips these values at 255, so scale 0..65535 to 0..255 instead.
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")

    if image.mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")

    if image.mode == "RGB":
        return image
    return image.convert("RGB")
