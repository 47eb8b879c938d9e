"""The dataset report: what a set of photos will teach, checked before any GPU time is spent.

Per photo: the faces found (``faces.py``), sharpness (the variance of the Laplacian), exposure
(mean brightness), its size against the buckets it will train at, and a perceptual hash (dHash)
that finds near-duplicates. For the set: how many photos show one clear face, and whether the
faces are one person (each photo's clearest face against the median of all of them). Findings are
plain sentences in ``warnings``; those that make ``datasets[].require_faces`` refuse a run (no
face, another person) are also in ``blocking``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastbackend.faces import SAME_PERSON, Face, FaceModel, distance, face_model
from fastbackend.layout import DatasetFolder

LOOK_SIDE = 512  # sharpness and exposure are judged at this longer side, whatever the camera
BLURRY = 40.0  # variance of the Laplacian (0-255 grey levels) under which a photo looks soft
DARK, BRIGHT = 0.2, 0.85  # mean brightness (0-1) outside which a photo is under- or overexposed
SMALL_FACE = 0.05  # of the photo's area: a face smaller than this teaches little likeness
NEAR_DUPLICATE_BITS = 6  # of the 64-bit dHash: closer than this, two photos are near-duplicates
IDENTITY_MIN_FACES = 3  # a median needs a majority to stand for "the person"


@dataclass
class PhotoReport:
    filename: str
    width: int
    height: int
    faces: list[Face]
    sharpness: float
    brightness: float
    dhash: int
    distance: float | None = None  # of its clearest face to the dataset's median face
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "filename": self.filename,
            "width": self.width,
            "height": self.height,
            "faces": [{"box": list(f.box), "share": round(f.share, 4), "score": f.score} for f in self.faces],
            "sharpness": round(self.sharpness, 1),
            "brightness": round(self.brightness, 3),
            "face_distance": None if self.distance is None else round(self.distance, 3),
            "notes": self.notes,
        }


def analyze(folder: DatasetFolder, resolutions: list[int]) -> dict:
    """The report of ``folder``'s photos for training at ``resolutions``."""
    model = face_model()
    photos = [look_at(path, model) for path in folder.image_files()]
    warnings, blocking = findings(photos, resolutions)
    with_one = sum(1 for p in photos if len(p.faces) == 1 and p.faces[0].share >= SMALL_FACE)
    return {
        "images": [photo.as_dict() for photo in photos],
        "summary": {
            "images": len(photos),
            "one_clear_face": with_one,
            "no_face": sum(1 for p in photos if not p.faces),
            "same_person": all(p.distance is None or p.distance <= SAME_PERSON for p in photos),
        },
        "warnings": warnings,
        "blocking": blocking,
    }


def look_at(path: Path, model: FaceModel) -> PhotoReport:
    """One photo's faces, sharpness, exposure and hash (it passed the upload's checks)."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    grey = image.convert("L")
    scale = LOOK_SIDE / max(grey.size)
    small = np.asarray(grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))))
    return PhotoReport(
        filename=path.name,
        width=image.width,
        height=image.height,
        faces=model.faces(image),
        sharpness=laplacian_variance(small.astype(np.float64)),
        brightness=float(small.mean() / 255),
        dhash=dhash(grey),
    )


def laplacian_variance(grey: np.ndarray) -> float:
    """The variance of the 4-neighbour Laplacian: high where edges are crisp, low when blurred."""
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def dhash(grey: Image.Image) -> int:
    """64-bit difference hash: is each pixel of a 9x8 thumbnail brighter than its right neighbour."""
    pixels = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def findings(photos: list[PhotoReport], resolutions: list[int]) -> tuple[list[str], list[str]]:
    """Plain warnings about the photos, and the blocking ones among them."""
    blocking: list[str] = []
    for photo in photos:
        photo_notes(photo, resolutions, blocking)
    warnings = [f"{photo.filename}: {note}" for photo in photos for note in photo.notes]
    small = [p.filename for p in photos if p.faces and p.faces[0].share < SMALL_FACE]
    if small:
        warnings.append(
            f"{len(small)} image(s) with the face under {SMALL_FACE:.0%} of the photo ({', '.join(small)}): "
            "crop closer or add close-ups"
        )
    for a, b in itertools.combinations(photos, 2):
        if bin(a.dhash ^ b.dhash).count("1") < NEAR_DUPLICATE_BITS:
            warnings.append(f"{a.filename} and {b.filename} are near-duplicates: they teach the same thing twice")
    warnings += identity(photos, blocking)
    return warnings, blocking


def photo_notes(photo: PhotoReport, resolutions: list[int], blocking: list[str]) -> None:
    if not photo.faces:
        photo.notes.append("no face found")
        blocking.append(f"{photo.filename}: no face found")
    elif len(photo.faces) > 1:
        photo.notes.append(f"{len(photo.faces)} faces; the likeness checks use the clearest")
    if photo.sharpness < BLURRY:
        photo.notes.append(f"looks blurry (sharpness {photo.sharpness:.0f}, under {BLURRY:.0f})")
    if not DARK <= photo.brightness <= BRIGHT:
        kind = "underexposed" if photo.brightness < DARK else "overexposed"
        photo.notes.append(f"{kind} (mean brightness {photo.brightness:.2f})")
    larger = [r for r in resolutions if photo.width * photo.height < r * r]
    if larger:
        shown = ", ".join(str(r) for r in larger)
        photo.notes.append(f"{photo.width}x{photo.height} is smaller than the {shown} px bucket(s): upscaled there")


def identity(photos: list[PhotoReport], blocking: list[str]) -> list[str]:
    """Each photo's clearest face against the median face of the set: another person stands out."""
    faced = [p for p in photos if p.faces]
    if len(faced) < IDENTITY_MIN_FACES:
        return []
    median = tuple(np.median(np.array([p.faces[0].embedding for p in faced]), axis=0).tolist())
    warnings = []
    for photo in faced:
        photo.distance = distance(photo.faces[0].embedding, median)
        if photo.distance > SAME_PERSON:
            message = f"{photo.filename}: the face differs from the others (distance {photo.distance:.2f})"
            photo.notes.append(message.split(": ", 1)[1])
            warnings.append(message)
            blocking.append(message)
    return warnings
