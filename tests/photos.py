"""Generated test photos: varied sizes, orientations and formats, some with EXIF rotation."""

from __future__ import annotations

import base64
import struct
import zlib

from PIL import Image

from devtools.photos import synthetic_photo

EXIF_ORIENTATION = 0x0112
# (width, height, format, EXIF orientation or None): nine photos of "one person".
NINE = [
    (640, 480, "JPEG", None),
    (480, 640, "JPEG", None),
    (512, 512, "PNG", None),
    (800, 600, "JPEG", 6),
    (600, 800, "JPEG", 8),
    (700, 400, "PNG", None),
    (400, 700, "JPEG", 3),
    (1024, 768, "JPEG", None),
    (300, 300, "PNG", None),
]


def photo(width: int, height: int, fmt: str = "JPEG", orientation: int | None = None, seed: int = 0) -> bytes:
    """A photo-like image, optionally tagged with an EXIF orientation."""
    exif = None
    if orientation:
        tags = Image.Exif()
        tags[EXIF_ORIENTATION] = orientation
        exif = tags.tobytes()
    return synthetic_photo(width, height, seed, fmt, exif)


def nine_photos() -> list[tuple[str, bytes, str]]:
    """(filename, bytes, caption) for the nine photos."""
    result = []
    for index, (width, height, fmt, orientation) in enumerate(NINE):
        ext = "jpg" if fmt == "JPEG" else "png"
        caption = f"Matt, photo {index}, {'portrait' if height > width else 'landscape'}"
        result.append((f"IMG_{index:04d}.{ext}", photo(width, height, fmt, orientation, seed=index), caption))
    return result


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(photo(300, 300, "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)
