"""What the dataset report and likeness scoring cost, on the CPU they run on.

The report looks at every photo once per run (faces, sharpness, exposure, hash); scoring looks
at each save's sample images. Both run on the worker's CPU while the GPU waits, so their cost is
set beside what they sit in: a FLUX.1 LoRA's 2,000 steps at the 0.6 s a step this project aims
for on an H200 (20 minutes), and a save's sample round (three 1024 x 1280 images).

    .venv/bin/python -m benchmarks.dataset_report
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image
from skimage import data

from fastbackend.dataset_report import analyze
from fastbackend.faces import face_model
from fastbackend.layout import DatasetFolder
from fastbackend.training import likeness

RUN_S = 2000 * 0.6  # the aim for the user's FLUX run on an H200 (README: On a GPU)


def photos(folder: Path, side: int, count: int) -> None:
    """``count`` photos of the astronaut at ``side`` px, each a little different."""
    folder.mkdir(parents=True)
    base = Image.fromarray(data.astronaut())
    for index in range(count):
        base.rotate(index * 2).resize((side, side)).save(folder / f"photo_{index}.jpg", quality=92)


def row(what: str, seconds: float, count: int) -> None:
    print(f"{what:<46}{seconds:>8.2f}{seconds / count:>9.2f}{seconds / RUN_S:>16.2%}")


def main() -> None:
    face_model()  # loaded once per worker; not part of a run's cost
    root = Path(tempfile.mkdtemp(prefix="report-bench-"))
    print(f"{'what':<46}{'s':>8}{'s each':>9}{'of a 20 min run':>17}")
    for side in (512, 1024, 4000):
        folder = root / f"set_{side}"
        photos(folder, side, 9)
        started = time.perf_counter()
        analyze(DatasetFolder(folder), [512, 768, 1024])
        seconds = time.perf_counter() - started
        row(f"dataset report, 9 photos of {side} px", seconds, 9)
    reference = likeness.reference_face([root / "set_1024"], [])
    assert reference is not None
    samples = root / "samples"
    samples.mkdir()
    images = []
    for index in range(3):
        path = samples / f"{index}.jpg"
        Image.fromarray(data.astronaut()).rotate(index * 3).resize((1024, 1280)).save(path)
        images.append(path)
    started = time.perf_counter()
    likeness.score(100, images, reference)
    seconds = time.perf_counter() - started
    row("likeness of one save (3 samples, 1024 x 1280)", seconds, 3)


if __name__ == "__main__":
    main()
