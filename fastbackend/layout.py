"""The on-disk formats: what a dataset folder and a trained LoRA's folder hold, by name and key.

The one owner of these names (the data root's own folders, locks and temporary files are
``storage``'s); the modules that write and read these folders go through it. It imports
neither torch nor Pillow, so listings and downloads stay light::

    training_data/<dataset>/   <image>, <image stem>.txt captions, manifest.json, .cache/latents/<model key>/
    output/<name>/             <name>.safetensors, <name>_<step, 9 digits>.safetensors, training_state.pt,
                               metadata.json, config.yaml, samples/<step, 9 digits>_<index>.<format>

A dataset's ``manifest.json`` is its commit point: ``{"images": {filename: entry}, "updated"}``,
an entry as ``ManifestEntry``; an image is part of the dataset only once the manifest lists it.
A LoRA file's header (safetensors ``__metadata__``) says how it was made, under the keys in
``HeaderKey``: ours, and kohya's ``ss_*`` names where kohya has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import NotRequired, TypedDict

from fastbackend.fingerprint import content_sha256
from fastbackend.storage import TEMP_SUFFIX, atomic_write_bytes, no_links

# The image formats a dataset holds (Pillow's names) and the extensions their files carry.
FORMATS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
IMAGE_EXTENSIONS = tuple(ext for exts in FORMATS.values() for ext in exts)
CAPTION_EXTENSION = ".txt"
LORA_SUFFIX = ".safetensors"
STEP_DIGITS = 9


# ---------------------------------------------------------------- datasets


class ManifestEntry(TypedDict):
    # Of the bytes as uploaded, the key that finds a photo sent again as a duplicate. A photo
    # with EXIF rotation is stored rewritten upright, so its file hashes differently.
    sha256: str
    width: int  # as seen: EXIF rotation applied
    height: int
    bytes: int  # of the stored file
    caption: str | None
    added: str  # ISO time
    # The caption is the captioner's (upload_training_data's auto_caption): it describes these bytes,
    # so new bytes under the name drop it, where a user's caption stays. Absent: the user's, or none.
    auto_caption: NotRequired[bool]


class Manifest(TypedDict, total=False):
    images: dict[str, ManifestEntry]  # by filename
    updated: str  # ISO time of the last commit
    # Overwritten images whose new bytes still wait under a hidden name (filename -> that name):
    # the manifest switches to them first, then each is renamed into place.
    pending: dict[str, str]


PENDING_PREFIX = ".pending-"


@dataclass(frozen=True)
class DatasetFolder:
    """``training_data/<name>/``: images, captions, the manifest and the latent cache."""

    path: Path

    MANIFEST = "manifest.json"
    CACHE = ".cache"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    def has_manifest(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> Manifest:
        """The manifest; an empty one when there is none yet."""
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return Manifest(images={})

    def images(self) -> dict[str, ManifestEntry]:
        return self.read_manifest()["images"]

    def image_files(self) -> list[Path]:
        """The dataset's images, sorted: those its manifest lists, or (a folder made by hand,
        with no manifest) every image file there."""
        if self.has_manifest():
            return [no_links(self.path / name) for name in sorted(self.images())]
        if not self.path.is_dir():
            return []
        return sorted(
            p
            for p in self.path.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_symlink()
        )

    def content_sha256(self) -> str:
        """The dataset's photos and user captions, by ``content_sha256``."""
        return content_sha256(
            (entry["sha256"], None if entry.get("auto_caption") else entry["caption"])
            for entry in self.images().values()
        )

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest atomically: the moment an upload becomes visible."""
        manifest["updated"] = now()
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())

    def caption_path(self, image_name: str) -> Path:
        return self.path / caption_name(image_name)

    def latent_cache(self, model_key: str) -> Path:
        """Where latents encoded by one base model's VAE are kept between runs."""
        return no_links(self.path / self.CACHE / "latents" / model_key)


def latent_name(image_sha256: str, bucket: tuple[int, int], face_crop: bool = False) -> str:
    """The latent-cache file of one image at one bucket size (width, height), cropped around its
    face or centred."""
    width, height = bucket
    return f"{image_sha256[:32]}_{width}x{height}{'_face' if face_crop else ''}.safetensors"


def caption_name(image_name: str) -> str:
    """``IMG_0405.jpg`` -> ``IMG_0405.txt``, as in kohya and ai-toolkit folders."""
    return f"{PurePosixPath(image_name).stem}{CAPTION_EXTENSION}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- trained LoRAs


class HeaderKey(StrEnum):
    """Keys of a LoRA file's header."""

    ARCH = "fastbackend_arch"
    TRIGGER_WORD = "fastbackend_trigger_word"
    CONFIG = "fastbackend_config"
    OUTPUT_NAME = "ss_output_name"
    BASE_MODEL = "ss_sd_model_name"
    BASE_MODEL_VERSION = "ss_base_model_version"
    NETWORK_MODULE = "ss_network_module"
    RANK = "ss_network_dim"
    ALPHA = "ss_network_alpha"
    STEPS = "ss_steps"
    RESOLUTION = "ss_resolution"
    DATASET_HASH = "ss_dataset_hash"
    MODELSPEC_ARCHITECTURE = "modelspec.architecture"


def read_header(path: Path) -> dict[str, str]:
    """The header of a safetensors file (no tensors are read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.metadata() or {}


class LoraRecord(TypedDict):
    """``metadata.json`` in a LoRA folder: what listings read instead of re-hashing files."""

    name: str
    arch: str
    base_model: str
    rank: int
    alpha: float
    steps: int
    dataset_hash: str
    sha256: dict[str, str]  # by LoRA file name
    loss_history: list[list[float]]
    likeness: NotRequired[list[dict]]  # [{step, score, faces_found, matches, images}] per scored save


@dataclass(frozen=True)
class LoraFolder:
    """``output/<name>/``: one training run's LoRA files, resumable state, record and samples."""

    path: Path

    STATE = "training_state.pt"
    METADATA = "metadata.json"
    CONFIG = "config.yaml"
    SAMPLES = "samples"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final_lora(self) -> Path:
        return self.path / f"{self.name}{LORA_SUFFIX}"

    def step_save(self, step: int) -> Path:
        return self.path / f"{self.name}_{step:0{STEP_DIGITS}d}{LORA_SUFFIX}"

    @property
    def state(self) -> Path:
        return self.path / self.STATE

    @property
    def metadata(self) -> Path:
        return self.path / self.METADATA

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def samples(self) -> Path:
        return self.path / self.SAMPLES

    def remove_temporaries(self) -> None:
        """Delete the hidden temporary files a killed writer left (the caller holds the folder's lock)."""
        for folder in (self.path, no_links(self.samples)):
            for path in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else []:
                path.unlink(missing_ok=True)

    def lora_files(self) -> list[Path]:
        """The final LoRA and step saves, sorted; temporary (dot) files are never listed."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.glob(f"*{LORA_SUFFIX}") if not p.name.startswith(".") and not p.is_symlink())

    def has_saves(self) -> bool:
        """Whether a run left anything worth keeping: a LoRA file or a state to resume."""
        return bool(self.lora_files()) or self.state.exists()

    def recorded_sha256(self) -> dict[str, str]:
        """sha256 per LoRA file as the trainer recorded it when saving."""
        try:
            return json.loads(self.metadata.read_text()).get("sha256", {})
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            return {}

    def recorded_likeness(self) -> dict[int, float]:
        """The likeness score of each scored save, by step (metadata.json)."""
        try:
            scores = json.loads(self.metadata.read_text()).get("likeness", [])
            return {int(s["step"]): float(s["score"]) for s in scores}
        except (FileNotFoundError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return {}

    def write_metadata(self, record: LoraRecord) -> None:
        atomic_write_bytes(self.metadata, json.dumps(record, indent=1).encode())

    def sample_path(self, step: int, index: int, fmt: str) -> Path:
        return no_links(self.samples) / f"{step:0{STEP_DIGITS}d}_{index}.{fmt}"

    def samples_by_step(self) -> dict[int, list[Path]]:
        """Sample images grouped by the step that made them (``<step>_<index>.<format>``)."""
        by_step: dict[int, list[Path]] = {}
        samples = no_links(self.samples)
        for path in sorted(samples.glob("*_*.*")) if samples.is_dir() else []:
            step, _, _ = path.stem.partition("_")
            if step.isdigit() and not path.name.startswith(".") and not path.is_symlink():
                by_step.setdefault(int(step), []).append(path)
        return by_step
