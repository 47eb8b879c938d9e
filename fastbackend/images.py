"""Decode and check one uploaded image with Pillow, with limits, before anything is stored.

An image is accepted only when it fully decodes (a truncated file fails here, not mid-training),
its format is one the trainer reads, its pixel count is under ``settings.MAX_IMAGE_PIXELS`` (checked
from the header, before decoding: decompression bombs never allocate) and its shorter side is
at least ``settings.MIN_IMAGE_SIDE``. EXIF orientation is applied so width and height are what a person
sees; the stored bytes are the original unless a rotation had to be baked in.

Images are checked from files (an upload stages them on the volume first), so memory holds one
decoded image per checking thread, whatever the request brings.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from fastbackend import settings
from fastbackend.layout import FORMATS

# What the worker writes (samples, generated images) in each format it offers, by extension.
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
EXIF_ORIENTATION = 0x0112
# What Pillow raises for damaged or hostile data, beyond UnidentifiedImageError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError)


class ImageProblem(ValueError):
    """Why an upload is not a usable image; the message is shown to the user after the file name."""


@dataclass(frozen=True)
class CheckedImage:
    size: int  # bytes of what is stored: the original file, or re-encoded when EXIF rotation was applied
    width: int
    height: int
    format: str
    rotated: bool


def check_image(path: Path) -> CheckedImage:
    """Fully decode the image file at ``path``, or raise ImageProblem.

    When EXIF says the photo is rotated, ``path`` is rewritten upright (it is the upload's own
    staged copy), so every later reader sees what a person sees.
    """
    max_bytes = settings.MAX_IMAGE_BYTES.get()
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageProblem(f"{size:,} bytes is over the {max_bytes:,}-byte limit per image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageProblem(_reason(exc)) from None
        except DECODE_ERRORS as exc:  # a header cut short or lying (PNG text chunks too large, ...)
            raise ImageProblem(f"could not be decoded ({type(exc).__name__}: {str(exc)[:100]})") from None
        with image:
            return _check_open_image(image, path, size)


def open_upright(path: Path) -> Image.Image:
    """An image of the dataset decoded for looking at (faces, sharpness): upright, RGB, within
    the upload's pixel limit (a folder made by hand skipped the upload's checks); ImageProblem
    otherwise."""
    try:
        with Image.open(path) as opened:
            max_pixels = settings.MAX_IMAGE_PIXELS.get()
            if opened.width * opened.height > max_pixels:
                raise ImageProblem(f"{opened.width}x{opened.height} is over the {max_pixels:,}-pixel limit")
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (FileNotFoundError, ImageProblem):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, *DECODE_ERRORS) as exc:
        raise ImageProblem(_reason(exc)) from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can decode"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels (over {settings.MAX_IMAGE_PIXELS.get():,}): refused as a possible decompression bomb"
    return f"could not be decoded ({exc})"


def _check_open_image(image: Image.Image, path: Path, size: int) -> CheckedImage:
    if image.format not in FORMATS:
        raise ImageProblem(f"format {image.format} is not accepted; use one of {', '.join(FORMATS)}")
    width, height = image.size
    max_pixels = settings.MAX_IMAGE_PIXELS.get()
    if width * height > max_pixels:
        raise ImageProblem(f"{width}x{height} is over the {max_pixels:,}-pixel limit")
    try:
        image.load()
    except DECODE_ERRORS as exc:  # truncated or corrupt data
        raise ImageProblem(f"could not be decoded ({exc})") from None
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    upright = ImageOps.exif_transpose(image) if orientation != 1 else image
    min_side = settings.MIN_IMAGE_SIDE.get()
    if min(upright.size) < min_side:
        raise ImageProblem(f"{upright.width}x{upright.height} is too small: the shorter side must be >= {min_side} px")
    if upright is image:
        return CheckedImage(size, width, height, image.format, rotated=False)
    _save_over(upright, image.format, path)
    return CheckedImage(path.stat().st_size, upright.width, upright.height, image.format, rotated=True)


def _save_over(image: Image.Image, fmt: str, path: Path) -> None:
    """Re-encode a rotated image in its own format (high JPEG quality: this is training data)."""
    options = {"quality": 95, "subsampling": 0} if fmt in ("JPEG", "WEBP") else {}
    upright = path.with_name(f"{path.name}.upright")
    with os.fdopen(os.open(upright, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as out:
        image.save(out, format=fmt, **options)
    upright.replace(path)
