"""Training examples: images in aspect-ratio buckets, captions per step, and the latent cache.

Each image is used at every listed resolution. For each (image, resolution) the bucket is the
size with about ``resolution**2`` pixels and the image's aspect ratio, snapped down to the
model's size step; the image is scaled to cover it and centre-cropped. The VAE encodes each
example once (the latent mean and std are kept, so each step still draws a fresh latent
sample); ``LatentCache`` keeps them in memory or beside the dataset for later runs.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from fastbackend.images import EXIF_ORIENTATION, ImageProblem
from fastbackend.layout import DatasetFolder, latent_name
from fastbackend.storage import temporary_path

# Buckets at or above this resolution snap to this step (as ai-toolkit's do), or to the
# model's own step when that is coarser.
BUCKET_STEP = 64
# ai-toolkit replaces both tags in captions and sample prompts with the trigger word.
TRIGGER_TAGS = ("[trigger]", "[name]")


@dataclass
class Item:
    """One image of a dataset, as uploaded."""

    path: Path
    sha256: str
    caption: str
    size: tuple[int, int]  # (width, height) as seen, EXIF rotation applied
    face: tuple[int, int, int, int] | None = None  # its clearest face (left, top, right, bottom), when looked for


@dataclass
class Example:
    """One image at one resolution: what a training step draws."""

    item: Item
    caption: str  # with the trigger word applied
    bucket: tuple[int, int]  # (width, height) in pixels
    sizes: tuple[int, ...] = (0, 0, 0, 0, 0, 0)  # orig h, w; crop top, left; h, w
    weight: float = 1.0
    face_crop: bool = False  # the crop keeps the item's face in frame (else it is centred)
    mean: torch.Tensor | None = None  # (C, h, w) latent mean, unscaled
    std: torch.Tensor | None = None


@dataclass
class CaptionOptions:
    trigger_word: str | None = None  # put into every caption: the dataset's, else the process's
    dropout_trigger: str | None = None  # what a dropped caption becomes: the process's trigger only
    dropout_rate: float = 0.0
    shuffle: bool = False


def read_items(folder: Path, default_caption: str | None) -> list[Item]:
    """The dataset's images: those its manifest lists, or (a folder made by hand) every image there."""
    dataset = DatasetFolder(folder)
    if dataset.has_manifest():
        return [
            Item(
                folder / name,
                entry["sha256"],
                entry["caption"] or default_caption or "",
                (entry["width"], entry["height"]),
            )
            for name, entry in sorted(dataset.images().items())
        ]
    items = []
    for path in dataset.image_files():
        caption_file = dataset.caption_path(path.name)
        caption = caption_file.read_text().strip() if caption_file.exists() else default_caption or ""
        items.append(Item(path, hashlib.sha256(path.read_bytes()).hexdigest(), caption, upright_size(path)))
    return items


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as seen, from the header alone: EXIF orientations 5-8 turn the image 90 degrees."""
    with Image.open(path) as image:
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        return (image.height, image.width) if turned else image.size


def dataset_hash(items: list[Item]) -> str:
    """Identifies the training data: image bytes and captions, in a stable order."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.sha256):
        digest.update(f"{item.sha256}:{item.caption}\n".encode())
    return digest.hexdigest()[:16]


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (on the CPU) in page-locked memory when there is a GPU to copy it to."""
    return tensor.pin_memory() if torch.cuda.is_available() and not tensor.is_pinned() else tensor


def staged(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. To a GPU it is copied from page-locked memory without waiting: a
    copy from ordinary memory first waits for the GPU to finish its queue, a stall every step."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return pinned(tensor).to(device, non_blocking=True)


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` joined along the batch dimension, each first padded with zeros at the end of
    dimension 1 to the longest (caption sequences of different lengths; a mask pads with 0s)."""
    if tensors[0].dim() < 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for tensor in tensors:
        padding = [0, 0] * (tensor.dim() - 2) + [0, longest - tensor.shape[1]]
        padded.append(torch.nn.functional.pad(tensor, padding))
    return torch.cat(padded)


def to_device(value: torch.Tensor | list[torch.Tensor], device) -> torch.Tensor | list[torch.Tensor]:
    """A tensor, or a list of them (Z-Image's prompt embeddings), on ``device``."""
    return [item.to(device) for item in value] if isinstance(value, list) else value.to(device)


def sample_prompt(prompt: str, trigger_word: str | None) -> str:
    """A sample prompt as the pipeline gets it: ``[trigger]`` replaced, nothing added."""
    return apply_trigger(prompt, trigger_word, add_if_missing=False)


def apply_trigger(caption: str, trigger_word: str | None, add_if_missing: bool = True) -> str:
    """ai-toolkit's rule (toolkit/prompt_utils.py inject_trigger_into_prompt): ``[trigger]`` and
    ``[name]`` become the trigger word, and a caption that still lacks it gets it in front,
    separated by a space. Sample prompts only have the tags replaced (``add_if_missing`` off).
    Outer spaces are stripped (ai-toolkit leaves a trailing one on an empty caption)."""
    for tag in TRIGGER_TAGS:
        caption = caption.replace(tag, trigger_word or "")
    if trigger_word and add_if_missing and trigger_word not in caption:
        caption = f"{trigger_word} {caption}"
    return caption.strip()


def caption_for_step(example: Example, options: CaptionOptions, rng: random.Random) -> str:
    """The caption one step trains on, as ai-toolkit's data loader and trainer make it.

    A dropped caption is the process's trigger word alone (empty without one): ai-toolkit drops
    it before the dataset's trigger goes in and the trainer adds the process's after, so the
    unconditioned steps keep the trigger tied to the subject. With ``shuffle`` every
    comma-separated part of the caption as written is shuffled, then the trigger goes in.
    """
    if options.dropout_rate and rng.random() < options.dropout_rate:
        return dropped_caption(options.dropout_trigger)
    if not options.shuffle:
        return example.caption
    parts = [part.strip() for part in example.item.caption.split(",") if part.strip()]
    rng.shuffle(parts)
    return apply_trigger(", ".join(parts), options.trigger_word)


def dropped_caption(trigger_word: str | None) -> str:
    return apply_trigger("", trigger_word)


def bucket_for(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The bucket (w, h) for an image: ~resolution**2 pixels (fewer for a smaller image), same aspect."""
    step = max(multiple, BUCKET_STEP) if resolution >= 4 * BUCKET_STEP else multiple
    area = min(resolution * resolution, width * height)
    bucket_w = math.sqrt(area * width / height)
    bucket_h = area / bucket_w
    return max(step, int(bucket_w // step) * step), max(step, int(bucket_h // step) * step)


def load_pixels(
    path: Path, bucket: tuple[int, int], face: tuple[int, int, int, int] | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The image scaled to cover ``bucket`` and cropped to it, centred, or around ``face`` when
    given: (3, h, w) in [-1, 1], plus its sizes."""
    target_w, target_h = bucket
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = max(target_w / image.width, target_h / image.height)
    resized = image.resize(
        (max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    left, top = crop_corner(resized.size, bucket, None if face is None else [v * scale for v in face])
    cropped = resized.crop((left, top, left + target_w, top + target_h))
    pixels = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(target_h, target_w, 3)
    pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (image.height, image.width, top, left, target_h, target_w)


def crop_corner(size: tuple[int, int], bucket: tuple[int, int], face: list[float] | None) -> tuple[int, int]:
    """The crop's top-left corner: centred, or centred on the face as far as the image allows
    (so a face that fits the crop is wholly inside it)."""
    (width, height), (target_w, target_h) = size, bucket
    if face is None:
        return (width - target_w) // 2, (height - target_h) // 2
    centre_x, centre_y = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    left = min(max(0, round(centre_x - target_w / 2)), width - target_w)
    top = min(max(0, round(centre_y - target_h / 2)), height - target_h)
    return left, top


def face_in_latents(example: Example, factor: int) -> tuple[int, int, int, int] | None:
    """The example's face box in its latent's cells (the crop and scale of ``sizes`` applied), or
    None when the face is outside the crop or unknown."""
    face = example.item.face
    if face is None:
        return None
    orig_h, orig_w, top, left, height, width = example.sizes
    scale = max(width / orig_w, height / orig_h)
    box = [face[0] * scale - left, face[1] * scale - top, face[2] * scale - left, face[3] * scale - top]
    x0, y0 = max(0, math.floor(box[0] / factor)), max(0, math.floor(box[1] / factor))
    x1, y1 = min(width // factor, math.ceil(box[2] / factor)), min(height // factor, math.ceil(box[3] / factor))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def make_examples(
    items: list[Item],
    resolutions: list[int],
    multiple: int,
    trigger_word: str | None,
    weight: float,
    face_crop: bool = False,
) -> list[Example]:
    examples = []
    for item in items:
        width, height = item.size
        for resolution in resolutions:
            examples.append(
                Example(
                    item,
                    apply_trigger(item.caption, trigger_word),
                    bucket_for(width, height, resolution, multiple),
                    weight=weight,
                    face_crop=face_crop and item.face is not None,
                )
            )
    return examples


def find_faces(items: list[Item], check_stop: Callable[[], None] = lambda: None) -> None:
    """Each item's clearest face, for face-aware crops and the face-weighted loss."""
    from fastbackend.faces import face_model, faces_in

    face_model()  # a model that cannot load fails the lookup, not each photo
    for item in items:
        check_stop()
        try:
            faces = faces_in(item.path)
        except (ImageProblem, FileNotFoundError):  # a photo past the pixel limit: trained centred
            faces = []
        item.face = faces[0].box if faces else None


@dataclass
class LatentCache:
    """Latent mean/std per (image, bucket) for one VAE, optionally persisted under the dataset."""

    folder: Path | None  # None: memory only

    def path(self, example: Example) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / latent_name(example.item.sha256, example.bucket, example.face_crop)

    def load(self, example: Example) -> bool:
        path = self.path(example)
        if path is None or not path.exists():
            return False
        tensors = load_file(str(path))
        example.mean, example.std = tensors["mean"], tensors["std"]
        example.sizes = tuple(int(v) for v in tensors["sizes"].tolist())
        return True

    def store(self, example: Example) -> None:
        path = self.path(example)
        if path is None or example.mean is None or example.std is None:
            return
        with temporary_path(path) as tmp:
            save_file(
                {
                    "mean": example.mean.contiguous(),
                    "std": example.std.contiguous(),
                    "sizes": torch.tensor(example.sizes),
                },
                str(tmp),
            )


def encode_example(example: Example, encode) -> tuple[torch.Tensor, torch.Tensor]:
    """The example's latent mean and std, straight from its image through ``encode`` (the VAE)."""
    face = example.item.face if example.face_crop else None
    pixels, example.sizes = load_pixels(example.item.path, example.bucket, face)
    mean, std = encode(pixels.unsqueeze(0))
    return mean[0], std[0]


def cache_latents(
    examples: list[Example], encode, caches: dict[Path, LatentCache], check_stop: Callable[[], None] = lambda: None
) -> int:
    """Fill each example's latent mean/std (from disk when cached); returns how many were encoded."""
    encoded = 0
    for example in examples:
        check_stop()  # between images: a latent file is whole or absent
        cache = caches[example.item.path.parent]
        if cache.load(example):
            continue
        example.mean, example.std = encode_example(example, encode)
        cache.store(example)
        encoded += 1
    return encoded


@dataclass
class BucketSampler:
    """Draws batches of examples that share a bucket (so they stack), weighted by dataset repeats."""

    examples: list[Example]
    batch_size: int
    rng: random.Random
    buckets: dict[tuple[int, int], list[Example]] = field(init=False)
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.buckets = {}
        for example in self.examples:
            self.buckets.setdefault(example.bucket, []).append(example)
        self.weights = [example.weight for example in self.examples]

    def next_batch(self) -> list[Example]:
        first = self.rng.choices(self.examples, weights=self.weights)[0]
        pool = self.buckets[first.bucket]
        others = [e for e in pool if e is not first]
        if len(others) >= self.batch_size - 1:
            return [first, *self.rng.sample(others, self.batch_size - 1)]
        return [first, *self.rng.choices(pool, k=self.batch_size - 1)]
