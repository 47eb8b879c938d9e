"""Likeness: how much the LoRA's samples look like the person in the dataset, scored at each save.

The reference is the median face embedding of the dataset's photos (each photo's clearest face,
``faces.py``). At every save and at the end the sample prompts are rendered with their fixed
seeds, and each image's clearest face is compared with the reference: its similarity is
``1 - distance`` (0 at the least), an image with no face counts 0, and a face within
``SAME_PERSON`` of the reference is a match. A checkpoint's score is the mean similarity over
its images. Scores rise as the LoRA learns the face and fall again when it overfits; the best
checkpoint is the saved file with the highest score.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from fastbackend.errors import FastBackendError
from fastbackend.faces import SAME_PERSON, distance, face_model, faces_in, median_face
from fastbackend.images import ImageProblem
from fastbackend.layout import DatasetFolder

log = logging.getLogger("fastbackend.trainer")


@dataclass(frozen=True)
class Likeness:
    step: int
    score: float  # mean similarity, 0-1
    faces_found: int
    matches: int  # faces within SAME_PERSON of the dataset's
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def reference_face(folders: list[Path], warnings: list[str]) -> tuple[float, ...] | None:
    """The dataset's median face, or None (and why, in ``warnings``) when there is none to score by."""
    try:
        face_model()
    except FastBackendError as exc:
        warnings.append(f"likeness is not scored: {exc.message}")
        return None
    found = []
    for folder in folders:
        for path in DatasetFolder(folder).image_files():
            try:
                faces = faces_in(path)
            except (ImageProblem, FileNotFoundError):  # the dataset report says why
                continue
            if faces:
                found.append(faces[0].embedding)
    if not found:
        warnings.append("likeness is not scored: no face was found in the dataset's photos")
        return None
    return median_face(found)


def score(step: int, images: list[Path], reference: tuple[float, ...]) -> Likeness:
    """The likeness of one checkpoint's sample images to the dataset's face."""
    model = face_model()
    similarities, found, matches = [], 0, 0
    for path in images:
        with Image.open(path) as image:  # our own sample, just written
            faces = model.faces(image)
        if not faces:
            similarities.append(0.0)
            continue
        gap = distance(faces[0].embedding, reference)
        found += 1
        matches += gap <= SAME_PERSON
        similarities.append(max(0.0, 1.0 - gap))
    mean = sum(similarities) / len(similarities) if similarities else 0.0
    return Likeness(step=step, score=round(mean, 4), faces_found=found, matches=matches, images=len(images))


def best(scores: list[Likeness]) -> Likeness | None:
    """The highest score; the earliest of equal ones (less training, the same likeness)."""
    return max(scores, key=lambda s: (s.score, -s.step)) if scores else None


def stalled(scores: list[Likeness], patience: int) -> bool:
    """Whether the last ``patience`` scores brought no improvement over the best before them."""
    if len(scores) <= patience:
        return False
    before = max(s.score for s in scores[:-patience])
    return all(s.score <= before for s in scores[-patience:])
