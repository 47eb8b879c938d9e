"""The dataset report: what a set of photos will teach, checked before any GPU time is spent.

Per photo: the faces found (``faces.py``), sharpness (the variance of the Laplacian), exposure
(mean brightness), its size against the buckets it will train at, and a perceptual hash (dHash)
that finds near-duplicates. For the set: how many photos show one clear face, and whether the
faces are one person (each photo's clearest face against the median of all of them). Findings are
plain sentences in ``warnings``; those that make ``datasets[].require_faces`` refuse a run (no
face, another person) are also in ``blocking``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastbackend import stopping
from fastbackend.faces import SAME_PERSON, Face, distance, face_model, faces_in, median_face
from fastbackend.images import ImageProblem, open_upright
from fastbackend.layout import DatasetFolder

LOOK_SIDE = 512  # sharpness and exposure are judged at this longer side, whatever the camera
BLURRY = 40.0  # variance of the Laplacian (0-255 grey levels) under which a photo looks soft
DARK, BRIGHT = 0.2, 0.85  # mean brightness (0-1) outside which a photo is under- or overexposed
SMALL_FACE = 0.05  # of the photo's area: a face smaller than this teaches little likeness
NEAR_DUPLICATE_BITS = 6  # of the 64-bit dHash: closer than this, two photos are near-duplicates
IDENTITY_MIN_FACES = 3  # a median needs a majority to stand for "the person"
FLAT = 2.0  # grey levels: a thumbnail this even (a plain colour) has no hash worth comparing
MAX_WARNINGS = 50  # the report travels in answers (RunPod's 10-20 MB limits): the rest are counted


@dataclass
class PhotoReport:
    filename: str
    width: int
    height: int
    faces: list[Face]
    sharpness: float | None
    brightness: float | None
    dhash: int | None  # None: a plain image, or unreadable
    distance: float | None = None  # of its clearest face to the dataset's median face
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "filename": self.filename,
            "width": self.width,
            "height": self.height,
            "faces": [{"box": list(f.box), "share": round(f.share, 4), "score": f.score} for f in self.faces],
            "sharpness": None if self.sharpness is None else round(self.sharpness, 1),
            "brightness": None if self.brightness is None else round(self.brightness, 3),
            "face_distance": None if self.distance is None else round(self.distance, 3),
            "notes": self.notes,
        }


def analyze(folder: DatasetFolder, resolutions: list[int], images: bool = True) -> dict:
    """The report of ``folder``'s photos for training at ``resolutions`` (``images``: with a row
    per photo, else the summary and findings only)."""
    face_model()  # a model that cannot load is said once, before any photo
    check_stop = stopping.stop_check(f"analyzing dataset {folder.name!r}")
    photos = []
    for path in folder.image_files():
        check_stop()
        photos.append(look_at(path))
    warnings, blocking = findings(photos, resolutions)
    with_one = sum(1 for p in photos if len(p.faces) == 1 and p.faces[0].share >= SMALL_FACE)
    checked = [p.distance for p in photos if p.distance is not None]
    report = {
        "summary": {
            "images": len(photos),
            "one_clear_face": with_one,
            "no_face": sum(1 for p in photos if not p.faces),
            # None: too few faces to tell (the check needs IDENTITY_MIN_FACES)
            "same_person": all(d <= SAME_PERSON for d in checked) if checked else None,
        },
        "warnings": capped(warnings),
        "blocking": capped(blocking),
    }
    return ({"images": [photo.as_dict() for photo in photos]} if images else {}) | report


def capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_WARNINGS:
        return lines
    return [*lines[:MAX_WARNINGS], f"and {len(lines) - MAX_WARNINGS} more"]


def look_at(path: Path) -> PhotoReport:
    """One photo's faces, sharpness, exposure and hash; an unreadable one says why."""
    try:
        image = open_upright(path)
    except (ImageProblem, FileNotFoundError) as exc:
        reason = str(exc) if isinstance(exc, ImageProblem) else "removed while the report ran"
        return PhotoReport(path.name, 0, 0, [], None, None, None, notes=[f"could not be read: {reason}"])
    grey = image.convert("L")
    scale = LOOK_SIDE / max(grey.size)
    size = (max(3, round(grey.width * scale)), max(3, round(grey.height * scale)))  # the Laplacian needs 3x3
    small = np.asarray(grey.resize(size))
    return PhotoReport(
        filename=path.name,
        width=image.width,
        height=image.height,
        faces=faces_in(path, image),
        sharpness=laplacian_variance(small.astype(np.float64)),
        brightness=float(small.mean() / 255),
        dhash=dhash(grey),
    )


def laplacian_variance(grey: np.ndarray) -> float:
    """The variance of the 4-neighbour Laplacian: high where edges are crisp, low when blurred."""
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def dhash(grey: Image.Image) -> int | None:
    """64-bit difference hash: is each pixel of a 9x8 thumbnail brighter than its right neighbour
    (None for a plain image, whose hash is all zeros like every other plain image's)."""
    pixels = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    if pixels.std() < FLAT:
        return None
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
    for group in near_duplicates(photos):
        names = ", ".join(p.filename for p in group[:-1]) + f" and {group[-1].filename}"
        warnings.append(f"{names} are near-duplicates: they teach the same thing twice")
    warnings += identity(photos, blocking)
    return warnings, blocking


def near_duplicates(photos: list[PhotoReport]) -> list[list[PhotoReport]]:
    """Groups of photos whose hashes are within NEAR_DUPLICATE_BITS of one another's (chained)."""
    hashed = [p for p in photos if p.dhash is not None]
    group_of = list(range(len(hashed)))

    def root(i: int) -> int:
        while group_of[i] != i:
            group_of[i] = group_of[group_of[i]]
            i = group_of[i]
        return i

    for i, a in enumerate(hashed):
        for j in range(i + 1, len(hashed)):
            if bin(a.dhash ^ hashed[j].dhash).count("1") < NEAR_DUPLICATE_BITS:  # type: ignore[operator]
                group_of[root(j)] = root(i)
    groups: dict[int, list[PhotoReport]] = {}
    for i, photo in enumerate(hashed):
        groups.setdefault(root(i), []).append(photo)
    return [group for group in groups.values() if len(group) > 1]


def photo_notes(photo: PhotoReport, resolutions: list[int], blocking: list[str]) -> None:
    if photo.sharpness is None:  # unreadable: its note says why
        blocking.append(f"{photo.filename}: {photo.notes[0]}")
        return
    if not photo.faces:
        photo.notes.append("no face found")
        blocking.append(f"{photo.filename}: no face found")
    elif len(photo.faces) > 1:
        photo.notes.append(f"{len(photo.faces)} faces; the likeness checks use the clearest")
    if photo.sharpness < BLURRY:
        photo.notes.append(f"looks blurry (sharpness {photo.sharpness:.0f}, under {BLURRY:.0f})")
    if photo.brightness is not None and not DARK <= photo.brightness <= BRIGHT:
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
    median = median_face([p.faces[0].embedding for p in faced])
    warnings = []
    for photo in faced:
        photo.distance = distance(photo.faces[0].embedding, median)
        if photo.distance > SAME_PERSON:
            message = f"{photo.filename}: the face differs from the others (distance {photo.distance:.2f})"
            photo.notes.append(message.split(": ", 1)[1])
            warnings.append(message)
            blocking.append(message)
    return warnings
