"""Faces in photos: where they are and whose they are.

dlib's HOG face detector, its 5-point landmarks and its 128-number face embeddings (a ResNet
trained for face verification: two photos of the same person lie within ``SAME_PERSON`` of each
other, 99.38% right on the LFW benchmark). The weights ship in the ``face-recognition-models``
package, installed with the worker: nothing is downloaded at run time. A photo is looked at with
its longer side at most ``DETECT_SIDE`` pixels; the detector finds faces from about 80 px there,
and from 40 px when it searches at twice the size: always in photos of ``SMALL_SIDE`` or less,
and in larger ones where the first search found none (a full-body photo's small face).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.images import open_upright

SAME_PERSON = 0.6  # dlib's own threshold for its embeddings
DETECT_SIDE = 1024
# The detector's score a face must reach. Its default (0) lets patterns on clothes through: on the
# test photos (scikit-image's astronaut, flipped, tilted, cropped) faces scored 1.1 to 1.6 and
# the false finds 0.04 to 0.26.
MIN_SCORE = 0.5
# A photo this small or smaller is searched at twice its size too (the detector's own upsampling),
# so that a face of 40 px is found; larger ones are not (it would only find more false faces).
SMALL_SIDE = 600
MODELS_PACKAGE = "face_recognition_models"
LANDMARKS = "shape_predictor_5_face_landmarks.dat"
EMBEDDINGS = "dlib_face_recognition_resnet_model_v1.dat"


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom, in the photo's pixels
    score: float  # the detector's confidence (above 0: a face)
    share: float  # of the photo's area
    embedding: tuple[float, ...]


class FaceModel:
    """The detector and the embedding network, loaded once; one photo at a time (dlib's models
    are not documented as thread-safe)."""

    def __init__(self) -> None:
        import dlib

        folder = models_folder()
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(folder / LANDMARKS))
        self.embedder = dlib.face_recognition_model_v1(str(folder / EMBEDDINGS))
        self.lock = threading.Lock()

    def faces(self, image: Image.Image) -> list[Face]:
        """The faces in ``image``, the most certain first."""
        scale = min(1.0, DETECT_SIDE / max(image.size))
        small = image.convert("RGB").resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
        )
        pixels = np.asarray(small)
        found = []
        with self.lock:
            upsample = 1 if max(small.size) <= SMALL_SIDE else 0
            boxes, scores, _ = self.detector.run(pixels, upsample, MIN_SCORE)
            if not boxes and not upsample:  # a full-body photo: the face may be under 80 px here
                boxes, scores, _ = self.detector.run(pixels, 1, MIN_SCORE)
            for box, score in zip(boxes, scores, strict=True):
                shape = self.landmarks(pixels, box)
                embedding = tuple(float(x) for x in self.embedder.compute_face_descriptor(pixels, shape))
                found.append(self._face(box, score, scale, image.size, embedding))
        return sorted(found, key=lambda face: face.score, reverse=True)

    @staticmethod
    def _face(box, score: float, scale: float, size: tuple[int, int], embedding: tuple[float, ...]) -> Face:
        width, height = size
        left, top = max(0, round(box.left() / scale)), max(0, round(box.top() / scale))
        right, bottom = min(width, round(box.right() / scale)), min(height, round(box.bottom() / scale))
        share = max(0, right - left) * max(0, bottom - top) / (width * height)
        return Face(box=(left, top, right, bottom), score=round(float(score), 3), share=share, embedding=embedding)


def models_folder() -> Path:
    """Where the weights are, found without importing the package (its ``__init__`` needs
    setuptools' retired ``pkg_resources``)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {MODELS_PACKAGE} package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@functools.lru_cache(maxsize=1)
def face_model() -> FaceModel:
    """The loaded face model, or ``model_load_failed`` naming it and why."""
    try:
        return FaceModel()
    except (ImportError, FileNotFoundError, RuntimeError) as exc:
        raise FastBackendError(
            f"the face model (dlib, with {MODELS_PACKAGE}) could not load: {type(exc).__name__}: {exc}",
            code=ErrorCode.MODEL_LOAD_FAILED,
        ) from None


# The faces of each dataset photo, by (path, modification time, size): the dataset report, the
# face crops and the likeness reference all look at the same photos in one run.
_FOUND: dict[tuple[Path, int, int], list[Face]] = {}
REMEMBERED = 4096


def faces_in(path: Path, image: Image.Image | None = None) -> list[Face]:
    """The faces in the photo at ``path`` (``image``: already opened upright), looked for once while
    the file is unchanged; ``ImageProblem`` when it cannot be read."""
    stat = path.stat()
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _FOUND:
        if len(_FOUND) >= REMEMBERED:
            _FOUND.pop(next(iter(_FOUND)))
        _FOUND[key] = face_model().faces(image if image is not None else open_upright(path))
    return _FOUND[key]


def median_face(embeddings: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The element-wise median of face embeddings: who a set of photos shows, outliers outvoted."""
    return tuple(np.median(np.array(embeddings), axis=0).tolist())


def distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Euclidean distance between two embeddings: under ``SAME_PERSON``, the same person."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
