"""Fingerprint arrays as lossless grayscale PNG images (8-bit "L" or 16-bit "I;16"), with Pillow.

An array of n values is laid out row by row in an image `width` pixels wide, the last row padded with
zeros. Decoding checks the declared size before any pixel is read, so a small file that claims a huge
image (a decompression bomb) is refused in bounded time and memory.
"""
import io
import warnings

import numpy as np
from PIL import Image

from deltamask.errors import PayloadError

_MODES = {8: "L", 16: "I;16"}
_DTYPES = {8: np.uint8, 16: np.uint16}


def image_shape(length: int, width: int) -> tuple:
    """(rows, width) of the image that holds `length` values."""
    return (-(-length // width), width) if length else (0, width)


def to_png(values: np.ndarray, width: int, bits: int, compress_level: int = 9) -> bytes:
    """Write `values` (uint8 for 8 bits, uint16 for 16) as a grayscale PNG `width` pixels wide."""
    rows, _ = image_shape(len(values), width)
    pixels = np.zeros(rows * width, dtype=np.dtype(_DTYPES[bits]).newbyteorder("<"))
    pixels[: len(values)] = values
    image = Image.frombytes(_MODES[bits], (width, rows), pixels.tobytes())
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def from_png(data: bytes, length: int, width: int, bits: int) -> np.ndarray:
    """Read back `length` values from a PNG written by `to_png`; PayloadError for any other image."""
    rows, _ = image_shape(length, width)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            if image.size != (width, rows):
                raise PayloadError(f"PNG is {image.size[0]}x{image.size[1]} pixels, expected {width}x{rows}")
            if image.mode not in _accepted_modes(bits):
                raise PayloadError(f"PNG has mode {image.mode!r}, expected {bits}-bit grayscale")
            image.load()
    except PayloadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        raise PayloadError(f"PNG unreadable: {exc}") from exc
    pixels = np.asarray(image)
    if bits == 16 and pixels.dtype != np.uint16:
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 0xFFFF:
            raise PayloadError("16-bit PNG holds values outside 0..65535")
        pixels = pixels.astype(np.uint16)
    return np.ascontiguousarray(pixels).reshape(-1)[:length]


def _accepted_modes(bits: int) -> tuple:
    # Pillow versions differ in how they open 16-bit grayscale: "I;16" now, "I" in older releases.
    return ("L",) if bits == 8 else ("I;16", "I;16B", "I;16L", "I")
