"""The memory plan: a training run's peak GPU memory, estimated before anything is loaded or downloaded.

Weights are counted exactly: every component of the pipeline is built on the meta device (no memory,
no download) from its config: the model's own when it is on the volume already, else the family's
published shapes (``training/shapes/<family>/``). Their bytes follow from the dtype and 8-bit
quantization. The LoRA's parameters, gradients and optimizer state follow from the targeted layers.
Activations come from the constants each family states (``Family.activation_bytes``).

The run has three phases and the peak is the largest: caching (text encoders and VAE on the device,
the denoiser not yet), training (the denoiser, the LoRA and its optimizer, activations), and
sampling (the VAE back beside the denoiser, to decode; the sample prompts were encoded with the
captions). ``fits`` compares the peak, with the
allocator's slack and the CUDA context added, with the GPU's memory; when it does not fit,
``suggestions`` names the cheapest changes that would.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastbackend import settings
from fastbackend.config import PREFIX, ProcessConfig
from fastbackend.hub_fetch import HUB_TIMEOUT_S
from fastbackend.storage import HUB_ID, cached_hub_file, cached_snapshot, hub_file
from fastbackend.training.caching import encoders_stay
from fastbackend.training.families import Family, family_for
from fastbackend.training.setup import bitsandbytes_available

SHAPES = Path(__file__).parent / "shapes"
GB = 1e9
# Beyond what torch allocates for tensors: the CUDA context and cuBLAS workspaces (about 0.5-1 GB
# on recent cards), and blocks the caching allocator reserves but cannot hand out (fragmentation).
CUDA_CONTEXT_GB = 1.0
ALLOCATOR_SLACK = 0.10
# Encoding or decoding with the VAE, in bf16 bytes per image pixel: its widest layers hold a few
# 128-channel full-resolution tensors at once (an estimate; not yet measured on a GPU).
VAE_BYTES_PER_PIXEL = 1536
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Bytes of optimizer state per trained parameter (AdamW: two fp32 moments; 8-bit: two bytes;
# Prodigy: four fp32 tensors; SGD: momentum, when set).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "adam8bit": 2, "prodigy": 16, "sgd": 4}
INT8_SCALE_BYTES = 4  # LLM.int8: one fp32 scale per output row


@dataclass(frozen=True)
class Shapes:
    """Parameter counts of a pipeline, from its configs built on the meta device."""

    source: str  # where the shapes came from, for the answer
    reference: bool  # the family's published shapes, not the model's own
    denoiser: int
    lora_targets: int  # parameters in the weights of the linear layers the LoRA adapts (quantize: 8-bit)
    lora_target_rows: int  # their output features (8-bit quantization keeps a scale per row)
    lora_per_rank: int  # LoRA parameters per unit of rank (in + out features of each target)
    text_encoders: dict[str, int]
    text_encoder_lora_per_rank: dict[str, int]
    vae: int
    denoiser_config: dict = field(repr=False)


@dataclass
class MemoryPlan:
    peak_gb: float
    phase: str  # the phase at the peak
    phases: dict[str, float]  # GB at each phase's peak
    parts: dict[str, float]  # GB of each part at the peak
    gpu_gb: float | None
    needed_gb: float  # the peak with the CUDA context and the allocator's slack
    source: str
    borrowed: bool = False  # the shapes are another model's (the family's published one)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_gb is None else self.needed_gb <= self.gpu_gb

    def summary(self) -> dict:
        return {
            "estimated_peak_gb": self.peak_gb,
            "needed_gb": self.needed_gb,
            "gpu_gb": self.gpu_gb,
            "fits": self.fits,
            "peak_phase": self.phase,
            "phases_gb": self.phases,
            "parts_gb": self.parts,
            "shapes": self.source,
            **({"suggestions": self.suggestions} if self.suggestions else {}),
        }


def plan_run(process: ProcessConfig, base_model: str, gpu_gb: float | None, adapter_bytes: int = 0) -> MemoryPlan:
    """The plan for ``process`` on a GPU of ``gpu_gb`` (None: no GPU to compare with), with
    suggestions when it does not fit; ``adapter_bytes``: a training adapter's file, on the denoiser."""
    family = family_for(process.model.resolved_arch, process.model.is_v_pred)
    shapes = count_shapes(family, *shapes_folder(family, base_model, process.model.revision))
    plan = estimate(process, family, shapes, gpu_gb, adapter_bytes)
    plan.borrowed = shapes.reference and base_model != family.reference_model
    if plan.fits is False:
        plan.suggestions = suggest(process, lambda changed: estimate(changed, family, shapes, gpu_gb, adapter_bytes))
    return plan


def adapter_file_bytes(reference: str | None) -> int:
    """The size of a training adapter's file (storage.resolve_lora_file's reference): on the volume,
    or as the hub says; 0 when it is not known (offline, gone: the plan leaves it out, and the load
    itself says what is wrong)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if reference is None:
        return 0
    try:
        if Path(reference).is_absolute():
            return Path(reference).stat().st_size
        repo_id, filename = hub_file(reference)
        if (found := cached_hub_file(repo_id, filename)) is not None:
            return found[1].stat().st_size
        url = hf_hub_url(repo_id, filename)
        return get_hf_file_metadata(url, token=settings.HF_TOKEN.get(), timeout=HUB_TIMEOUT_S).size or 0
    except Exception:
        return 0


def shapes_folder(family: Family, base_model: str, revision: str | None) -> tuple[Path, str]:
    """The model's own folder when it is here (a folder, or a complete copy in the hub cache),
    else the family's published shapes: the plan never waits for a download."""
    if HUB_ID.fullmatch(base_model):
        cached = cached_snapshot(base_model, revision)
        if cached is not None:
            return cached, f"{base_model} (its configs on the volume)"
    elif (Path(base_model) / "model_index.json").is_file():
        return Path(base_model), "the model's own configs"
    reason = "not on the volume yet" if HUB_ID.fullmatch(base_model) else "its configs could not be read"
    return SHAPES / family.name, f"{family.reference_model}'s published shapes (the model is {reason})"


def count_shapes(family: Family, folder: Path, source: str) -> Shapes:
    reference = SHAPES / family.name
    try:  # cached per folder as its configs are now: a model replaced in place is counted again
        modified = tuple(path.stat().st_mtime_ns for path in sorted(folder.glob("*/config.json")))
        return _count_shapes(family.name, folder, modified, source, folder == reference)
    except Exception:  # configs this can't build: the model's load will say what is wrong with it
        if folder == reference:
            raise
        source = f"{family.reference_model}'s published shapes (the model's own configs could not be read)"
        return _count_shapes(family.name, reference, (), source, True)


@functools.lru_cache(maxsize=8)
def _count_shapes(family_name: str, folder: Path, modified: tuple, source: str, reference: bool) -> Shapes:
    family = family_for(family_name)
    index = json.loads((folder / "model_index.json").read_text())
    library, class_name = index[family.denoiser_name]
    if class_name != family.denoiser_class_name:  # another family's model: its load names both
        raise ValueError(f"{family.denoiser_name} is a {class_name}")
    denoiser = build_on_meta(folder / family.denoiser_name, library, class_name)
    layers = [denoiser.get_submodule(name) for name in family.lora_targets(denoiser)]
    targets = [layer for layer in layers if isinstance(layer, torch.nn.Linear)]  # what quantize_8bit swaps
    text_encoders, text_encoder_lora = {}, {}
    for name in ("text_encoder", "text_encoder_2"):
        if isinstance(index.get(name), list) and index[name][1] is not None:
            encoder = build_on_meta(folder / name, *index[name])
            text_encoders[name] = parameters(encoder)
            if family.trains_text_encoders:
                adapted = [encoder.get_submodule(n) for n in family.text_encoder_lora_targets(encoder)]
                text_encoder_lora[name] = sum(lora_width(layer) for layer in adapted)
    return Shapes(
        source=source,
        reference=reference,
        denoiser=parameters(denoiser),
        lora_targets=sum(layer.weight.numel() for layer in targets),
        lora_target_rows=sum(layer.weight.shape[0] for layer in targets),
        lora_per_rank=sum(lora_width(layer) for layer in layers) - shared_down_width(family, denoiser),
        text_encoders=text_encoders,
        text_encoder_lora_per_rank=text_encoder_lora,
        vae=parameters(build_on_meta(folder / "vae", *index["vae"])),
        denoiser_config=dict(denoiser.config),
    )


def build_on_meta(folder: Path, library: str, class_name: str) -> torch.nn.Module:
    """A diffusers or transformers model of ``class_name`` from ``folder``'s config.json, on the
    meta device: its shapes without its memory."""
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"{folder.name}: a {library} component")
    found = getattr(importlib.import_module(library), class_name)
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ValueError(f"{folder.name}: {class_name} is not a model")
    model_class: Any = found
    with torch.device("meta"):
        if library == "diffusers":
            return model_class.from_config(model_class.load_config(folder))
        from transformers import AutoConfig

        return model_class(AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False))


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shared_down_width(family: Family, denoiser: torch.nn.Module) -> int:
    """LoRA parameters per unit of rank that layers sharing one ``lora_A`` do not have twice."""
    groups = family.shared_lora_down(denoiser)
    return sum(denoiser.get_submodule(name).in_features for first, *rest in groups for name in rest)


def lora_width(layer: torch.nn.Module) -> int:
    """LoRA parameters per unit of rank on ``layer``: A is rank x in, B is out x rank."""
    if isinstance(layer, torch.nn.Conv2d):
        return layer.in_channels + layer.out_channels
    return layer.in_features + layer.out_features


def estimate(
    process: ProcessConfig, family: Family, shapes: Shapes, gpu_gb: float | None, adapter_bytes: int = 0
) -> MemoryPlan:
    """The phases of a run of ``process`` over a pipeline of ``shapes``, in GB."""
    train = process.train
    weight = DTYPE_BYTES[train.dtype]
    scale = weight / 2  # activations were measured in bf16
    size = process.largest_resolution  # the largest bucket a photo can reach
    if process.model.quantize and bitsandbytes_available():  # else the trainer keeps full precision
        frozen = shapes.lora_targets + shapes.lora_target_rows * INT8_SCALE_BYTES
        denoiser = frozen + (shapes.denoiser - shapes.lora_targets) * weight
    else:
        denoiser = shapes.denoiser * weight
    trained_text = train.train_text_encoder and family.trains_text_encoders
    lora = shapes.lora_per_rank + (sum(shapes.text_encoder_lora_per_rank.values()) if trained_text else 0)
    per_param = 4 + 4 + OPTIMIZER_STATE_BYTES[train.optimizer] + (4 if train.ema_config.use_ema else 0)
    lora_bytes = lora * process.network.rank * per_param
    encoders = sum(shapes.text_encoders.values()) * weight
    vae = shapes.vae * weight
    vae_work = VAE_BYTES_PER_PIXEL * (4 if family.vae_encode_dtype == torch.float32 else weight) / 2
    steps = family.activation_bytes(shapes.denoiser_config, size, size, train.gradient_checkpointing)
    activations = steps.total * train.batch_size * scale
    stays = encoders_stay(process, trained_text)
    phases = {
        "caching": {"text_encoders": encoders, "vae": vae, "vae_work": vae_work * size * size},
        "training": {"denoiser": denoiser, "lora_and_optimizer": lora_bytes, "activations": activations}
        | ({"text_encoders": encoders, "vae": vae} if stays else {}),
    }
    adapter = {"training_adapter": adapter_bytes} if adapter_bytes else {}
    phases["training"] |= adapter
    sample = process.sample
    if sample is not None and process.sample_prompts:
        pixels = sample.width * sample.height
        guided = family.guided(sample.guidance_scale)
        inference = family.activation_bytes(shapes.denoiser_config, sample.width, sample.height, True)
        phases["sampling"] = {  # the prompts were encoded before training unless the encoders stay anyway
            "denoiser": denoiser,
            "lora_and_optimizer": lora_bytes,
            **adapter,
            **({"text_encoders": encoders} if stays else {}),
            "vae": vae,
            "vae_work": vae_work * pixels,
            # one block at a time, for two images with classifier-free guidance
            "activations": inference.largest_block * (2 if guided else 1) * scale,
        }
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    phase = max(totals, key=lambda name: totals[name])
    peak = totals[phase] / GB
    return MemoryPlan(
        peak_gb=round(peak, 1),
        phase=phase,
        phases={name: round(total / GB, 1) for name, total in totals.items()},
        parts={name: round(value / GB, 2) for name, value in phases[phase].items()},
        gpu_gb=gpu_gb,
        needed_gb=round(peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GB, 1),
        source=shapes.source,
    )


def changes(process: ProcessConfig) -> list[tuple[str, Callable[[ProcessConfig], None]]]:
    """What can make a run smaller, cheapest first (in quality and speed), as (label, change)."""
    train, options = process.train, []
    if train.dtype in ("fp32", "float32"):
        options.append(("train.dtype: bf16", setting("train", "dtype", "bf16")))
    if not train.cache_text_embeddings:
        options.append(("train.cache_text_embeddings: true", setting("train", "cache_text_embeddings", True)))
    if train.optimizer in ("adamw", "adam", "prodigy"):
        options.append(("train.optimizer: adamw8bit", setting("train", "optimizer", "adamw8bit")))
    if not train.gradient_checkpointing:
        options.append(("train.gradient_checkpointing: true", setting("train", "gradient_checkpointing", True)))
    if not process.model.quantize:
        options.append(("model.quantize: true", setting("model", "quantize", True)))
    if train.batch_size > 1:
        options.append(("train.batch_size: 1", setting("train", "batch_size", 1)))
    for smaller in (1024, 768, 512):
        if smaller < process.largest_resolution:
            options.append((f"datasets[].resolution: at most {smaller}", functools.partial(cap_resolution, smaller)))
    sample = process.sample
    if sample is not None and process.sample_prompts:
        if max(sample.width, sample.height) > 1024:
            options.append(("sample.width and height: at most 1024", cap_sample_size))
        options.append(("train.disable_sampling: true", setting("train", "disable_sampling", True)))
    return options


def cap_sample_size(process: ProcessConfig) -> None:
    sample = process.sample
    assert sample is not None
    scale = 1024 / max(sample.width, sample.height)
    sample.width, sample.height = int(sample.width * scale), int(sample.height * scale)


def setting(section: str, name: str, value: object) -> Callable[[ProcessConfig], None]:
    return lambda process: setattr(getattr(process, section), name, value)


def cap_resolution(limit: int, process: ProcessConfig) -> None:
    for dataset in process.datasets:
        dataset.resolution = [r for r in dataset.resolution if r <= limit] or [limit]


def suggest(process: ProcessConfig, plan_of: Callable[[ProcessConfig], MemoryPlan]) -> list[str]:
    """Single changes that fit, cheapest first; else the cheapest run of changes together that fits."""
    options = changes(process)
    fitting = []
    for label, change in options:
        alone = process.model_copy(deep=True)
        change(alone)
        if (plan := plan_of(alone)).fits:
            fitting.append(f"{PREFIX}.{label} ({plan.needed_gb:g} GB)")
    if fitting:
        return fitting
    together = process.model_copy(deep=True)
    for count, (_, change) in enumerate(options, start=1):
        change(together)
        if (plan := plan_of(together)).fits:
            labels = ", ".join(f"{PREFIX}.{label}" for label, _ in options[:count])
            return [f"{labels}, together ({plan.needed_gb:g} GB)"]
    return []
