"""Generated test photos: varied sizes, orientations and formats, some with EXIF rotation."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

from PIL import Image

EXIF_ORIENTATION = 0x0112
# (width, height, format, EXIF orientation or None): nine photos of "one person".
NINE = [
    (640, 480, "JPEG", None), (480, 640, "JPEG", None), (512, 512, "PNG", None),
    (800, 600, "JPEG", 6), (600, 800, "JPEG", 8), (700, 400, "PNG", None),
    (400, 700, "JPEG", 3), (1024, 768, "JPEG", None), (300, 300, "PNG", None),
]


def photo(width: int, height: int, fmt: str = "JPEG", orientation: int | None = None, seed: int = 0) -> bytes:
    """A noisy gradient photo (noise keeps JPEG sizes realistic and every photo distinct)."""
    rng = random.Random(seed)
    image = Image.radial_gradient("L").resize((width, height)).convert("RGB")
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    image = Image.blend(image, noise, 0.5)
    out = io.BytesIO()
    options = {}
    if orientation:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    image.save(out, format=fmt, **options)
    return out.getvalue()


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
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)
