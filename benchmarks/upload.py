"""Upload throughput: 40 photos of ~3 MB through ``handler``, against the by-hand floor.

The handler path: JSON request of base64 photos (two per request, under the 10 MB limit),
base64 decode, sha256, a full Pillow decode with limits, atomic fsync'd writes, manifest.
The floor, in the same run on the same bytes: Pillow decode, then a plain write to disk.
Aim: the handler within 1.5x of the floor.

    .venv/bin/python -m benchmarks.upload [--photos 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

PER_REQUEST = 2
LIMIT_BYTES = 10_000_000


def make_photos(count: int) -> list[tuple[str, bytes]]:
    """Phone-like JPEGs of ~3 MB: 2000x1500 with fine noise at quality 95."""
    rng = random.Random(0)
    photos = []
    for index in range(count):
        base = Image.linear_gradient("L").resize((2000, 1500)).convert("RGB")
        noise = Image.frombytes("RGB", (2000, 1500), rng.randbytes(2000 * 1500 * 3))
        out = io.BytesIO()
        Image.blend(base, noise, 0.5).save(out, format="JPEG", quality=95)
        photos.append((f"IMG_{index:04d}.jpg", out.getvalue()))
    return photos


def through_handler(photos: list[tuple[str, bytes]], root: Path) -> float:
    import json

    os.environ["FASTBACKEND_DATA_DIR"] = str(root)
    from handler_fast import handler

    # Encoding the requests is the client's work, not the worker's: done before the clock.
    jobs = []
    for start in range(0, len(photos), PER_REQUEST):
        files = [
            {"filename": n, "content": base64.b64encode(d).decode(), "caption": "Matt, photo"}
            for n, d in photos[start : start + PER_REQUEST]
        ]
        job = {
            "id": f"bench-{start}",
            "input": {"type": "upload_training_data", "training_name": "bench", "files": files},
        }
        assert len(json.dumps(job["input"]).encode()) < LIMIT_BYTES
        jobs.append(job)
    begin = time.perf_counter()
    for job in jobs:
        answer = handler(job)
        assert answer["status"] == "success", answer
    return time.perf_counter() - begin


def by_hand(photos: list[tuple[str, bytes]], root: Path) -> float:
    root.mkdir(parents=True)
    begin = time.perf_counter()
    for name, data in photos:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        (root / name).write_bytes(data)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging

    logging.getLogger("fastbackend").setLevel(logging.WARNING)  # one log line per request would be timed too
    photos = make_photos(args.photos)
    megabytes = sum(len(d) for _, d in photos) / 1e6
    times: dict[str, list[float]] = {"Pillow decode + write (floor)": [], "handler upload_training_data": []}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            times["Pillow decode + write (floor)"].append(by_hand(photos, Path(tmp) / "floor"))
            times["handler upload_training_data"].append(through_handler(photos, Path(tmp) / f"volume{repeat}"))
    floor = statistics.median(times["Pillow decode + write (floor)"])
    print(f"{args.photos} photos, {megabytes:.1f} MB, {PER_REQUEST} per request")
    print(f"{'path':<32}{'median s':>10}{'MB/s':>8}{'ratio':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<32}{median:>10.2f}{megabytes / median:>8.1f}{median / floor:>8.2f}")


if __name__ == "__main__":
    main()
