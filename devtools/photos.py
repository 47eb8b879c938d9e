"""Synthetic photos for the demo, the tests and the benchmarks (no real faces, no files)."""

from __future__ import annotations

import io
import random


def synthetic_photo(width: int, height: int, seed: int, fmt: str = "JPEG", exif: bytes | None = None) -> bytes:
    """A noisy radial gradient: distinct per seed, compressible like a photo."""
    from PIL import Image

    rng = random.Random(seed)
    base = Image.radial_gradient("L").resize((width, height)).convert("RGB")
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    out = io.BytesIO()
    Image.blend(base, noise, 0.5).save(out, format=fmt, **({"exif": exif} if exif else {}))
    return out.getvalue()
