"""Latents and caption embeddings computed once before the loop, and the encoders off the device after.

The VAE encodes each example once (mean and std, so every step still draws a fresh latent);
with ``cache_latents_to_disk`` the latents are kept beside the dataset, per base model, for later
runs. Captions are encoded once each, unless text encoders train or captions change per step.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastbackend.config import ProcessConfig
from fastbackend.errors import FastBackendError
from fastbackend.layout import DatasetFolder
from fastbackend.stopping import JobStopped
from fastbackend.training import data
from fastbackend.training.families import Family

log = logging.getLogger("fastbackend.trainer")


class TextCache:
    """Caption -> conditioning tensors, encoded once each; or every step, with gradients when the
    text encoders train (``trainable``) or when ``memoize`` is off."""

    def __init__(self, family: Family, pipe, device: torch.device, memoize: bool = True, trainable: bool = False):
        self.family, self.pipe, self.device = family, pipe, device
        self.memoize, self.trainable = memoize and not trainable, trainable
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.samples: dict[str, dict[str, torch.Tensor]] = {}  # sample prompt -> the pipeline's prompt arguments

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        if not self.memoize:
            with torch.set_grad_enabled(self.trainable):
                return self.family.encode_prompt(self.pipe, caption)
        if caption not in self.cache:
            with torch.no_grad():
                encoded = self.family.encode_prompt(self.pipe, caption)
            self.cache[caption] = {key: data.pinned(value.cpu()) for key, value in encoded.items()}
        return self.cache[caption]

    @torch.no_grad()
    def encode_samples(self, prompts: list[str], negative_prompt: str, guidance_scale: float) -> None:
        """Encode the sample prompts now, while the text encoders are on the device."""
        for prompt in prompts:
            encoded = self.family.encode_for_sampling(self.pipe, prompt, negative_prompt, guidance_scale)
            self.samples[prompt] = {key: data.to_device(value, "cpu") for key, value in encoded.items()}

    def batch(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The captions' conditioning stacked; sequences of different lengths (Z-Image's captions are
        as long as their tokens) padded with zeros at the end, masks included."""
        conds = [self.get(caption) for caption in captions]
        return {key: data.pad_cat([data.staged(c[key], self.device) for c in conds]) for key in conds[0]}


def prepare_data(
    family: Family,
    pipe,
    process: ProcessConfig,
    folders: list[Path],
    base_model: str,
    device: torch.device,
    rng: random.Random,
    trains_text_encoder: bool,
    warnings: list[str],
    check_stop: Callable[[], None] = lambda: None,
) -> tuple[TextCache, data.BucketSampler, str]:
    """Examples with cached latents, a caption cache, the batch sampler and the dataset hash;
    ``check_stop`` runs between photos and captions."""
    multiple = family.pixel_multiple(pipe)
    examples, items, caches = [], [], {}
    captions = set()
    for folder, dataset_cfg in zip(folders, process.datasets, strict=True):
        found = data.read_items(folder, dataset_cfg.default_caption)
        items += found
        face_crop = dataset_cfg.face_crop is not False
        if face_crop or process.train.face_loss_weight is not None:
            face_crop &= look_for_faces(
                found, dataset_cfg.face_crop, process.train.face_loss_weight, warnings, check_stop
            )
        trigger_word = dataset_cfg.trigger_word or process.trigger_word
        made = data.make_examples(
            found, dataset_cfg.resolution, multiple, trigger_word, dataset_cfg.num_repeats, face_crop
        )
        examples += made
        captions |= {e.caption for e in made} | {data.dropped_caption(process.trigger_word)}
        if dataset_cfg.cache_latents or dataset_cfg.cache_latents_to_disk:
            on_disk = DatasetFolder(folder).latent_cache(model_key(base_model))
            caches[folder] = data.LatentCache(on_disk if dataset_cfg.cache_latents_to_disk else None)
    started = time.monotonic()
    cached = [e for e in examples if e.item.path.parent in caches]
    encoded = data.cache_latents(cached, lambda pixels: family.encode_pixels(pipe, pixels), caches, check_stop)
    texts = TextCache(family, pipe, device, memoize=process.train.cache_text_embeddings, trainable=trains_text_encoder)
    if texts.memoize:
        for caption in captions:
            check_stop()
            texts.get(caption)
    log.info(
        "cached %d of %d latents (%d encoded, %d from disk) and %d captions in %.1fs",
        len(cached),
        len(examples),
        encoded,
        len(cached) - encoded,
        len(texts.cache),
        time.monotonic() - started,
    )
    if not encoders_stay(process, trains_text_encoder):
        if process.sample is not None and process.sample_prompts:  # samples won't need them either
            prompts = [data.sample_prompt(prompt, process.trigger_word) for prompt in process.sample_prompts]
            texts.encode_samples(prompts, process.sample.negative_prompt, process.sample.guidance_scale)
        offload_encoders(family, pipe)
    return texts, data.BucketSampler(examples, process.train.batch_size, rng), data.dataset_hash(items)


def look_for_faces(
    items: list[data.Item],
    face_crop: bool | None,
    face_weight: float | None,
    warnings: list[str],
    check_stop: Callable[[], None],
) -> bool:
    """Find each photo's face; False when the face model cannot load and nothing asked for it by
    name (the default face crop then falls back to centred crops, with a warning)."""
    try:
        data.find_faces(items, check_stop)
    except JobStopped:
        raise
    except FastBackendError as exc:
        if face_crop or face_weight is not None:
            raise
        warnings.append(f"photos are centre-cropped: {exc.message}")
        return False
    return True


def model_key(base_model: str) -> str:
    """Latents depend on the VAE: cache them per base model."""
    return hashlib.sha256(base_model.encode()).hexdigest()[:16]


def encoders_stay(process: ProcessConfig, trains_text_encoder: bool) -> bool:
    """Whether steps still need the VAE or text encoders (anything not cached up front)."""
    return (
        trains_text_encoder
        or not process.train.cache_text_embeddings
        or any(d.shuffle_tokens or not (d.cache_latents or d.cache_latents_to_disk) for d in process.datasets)
    )


def offload_encoders(family: Family, pipe) -> None:
    """Free the device of the text encoders and VAE while the loop runs (sampling brings them back)."""
    for module in family.encoders(pipe):
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
