"""What the trainer needs from a model family, declared once: ``Family``.

A family wraps a diffusers pipeline loaded by ``name_or_path`` (a hub id, cached under the data
root, or a local folder). The trainer, ``generate`` and the LoRA files talk to a family only
through this interface; each family lives in its own file and is found through the registry in
``families/__init__.py``, never by ``if arch == ...``.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from fastbackend import hub_fetch, stopping
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.storage import DIFFUSERS_FILES, HUB_ID, cached_snapshot


@dataclass
class TrainingBatch:
    """One training batch from one aspect bucket. ``sizes``: per image (orig_h, orig_w, top, left, h, w)."""

    latents: torch.Tensor  # (B, C, H/f, W/f), scaled for the denoiser
    cond: dict[str, torch.Tensor]  # caption conditioning, batch dim B
    sizes: torch.Tensor  # (B, 6)
    loss_weights: torch.Tensor | None = None  # (B, 1, H/f, W/f): the face-weighted loss; None: even


@dataclass
class LossOptions:
    scheduler: Any  # a diffusers noise scheduler
    timestep_type: str = "sigmoid"  # flow matching: how noise levels are drawn
    linear_timesteps: bool = False  # flow matching: linear levels, the loss weighted by a bell curve
    content_or_style: str = "balanced"  # which end of the noise levels to favour
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None


@dataclass(frozen=True)
class ActivationBytes:
    """A training step's activations for one example, in bf16 bytes: what the forward pass keeps for
    the backward pass, and one block's own activations, which the backward pass holds again while it
    re-runs that block (gradient checkpointing) or holds as that block's gradients (without)."""

    kept: int
    largest_block: int

    @property
    def total(self) -> int:
        return self.kept + self.largest_block


@dataclass(frozen=True)
class PerToken:
    """What a transformer's training step keeps for the backward pass, per token per hidden unit, as
    multiples of bf16's size (measured with devtools/memory.py): per block of each kind (FLUX: double,
    single), outside the blocks, and with gradient checkpointing, where a block keeps only its inputs
    and one block's own activations come back while it re-runs."""

    per_block: tuple[float, ...]
    outside: float
    checkpointed_block: float
    checkpointed_outside: float
    largest_block: float

    def bytes(self, tokens: int, hidden: int, blocks: tuple[int, ...], checkpointing: bool) -> ActivationBytes:
        """For ``tokens`` (image and caption) of ``hidden`` units through ``blocks`` blocks of each kind."""
        unit = tokens * hidden * 2  # bf16
        if checkpointing:
            kept = self.checkpointed_outside + self.checkpointed_block * sum(blocks)
        else:
            kept = self.outside
            for per_block, count in zip(self.per_block, blocks, strict=True):
                kept += per_block * count
        return ActivationBytes(kept=round(kept * unit), largest_block=round(self.largest_block * unit))


@dataclass(frozen=True)
class PerUnit:
    """Bytes as ``fixed + per_unit * units``: a straight line through two measured sizes."""

    fixed: float
    per_unit: float

    def at(self, units: float) -> int:
        return round(self.fixed + self.per_unit * units)


# ai-toolkit draws an index into a table of 1000 noise levels, most noise first.
NOISE_LEVELS = 1000


def linear_layers_under(module: torch.nn.Module, prefixes: str | tuple[str, ...]) -> list[str]:
    """The Linear layers of ``module`` whose names start with one of ``prefixes`` (a transformer's
    main blocks: where ai-toolkit's ``transformer_only`` LoRA goes)."""
    return module_names(module, lambda name, m: name.startswith(prefixes) and isinstance(m, torch.nn.Linear))


PEFT_PARTS = re.compile(r"\.lora_\w+(\.|$)")  # peft's parts of a LoRA layer: lora_A.<adapter>, lora_dropout, ...


def noise_level_indices(batch_size: int, content_or_style: str, device) -> torch.Tensor:
    """Indices into a table of ``NOISE_LEVELS`` noise levels sorted from most to least noise.

    "balanced" is uniform over 0..998 (ai-toolkit's randint(0, 999) leaves the last level out);
    "content" favours noisy levels (index u^3 * 1000), "style" clean ones ((1 - u^3) * 1000), as
    ai-toolkit's `content_or_style` (after diffusers' T2I-Adapter training, arXiv:2302.08453 3.4).
    """
    if content_or_style == "balanced":
        return torch.randint(0, NOISE_LEVELS - 1, (batch_size,), device=device)
    cubed = torch.rand(batch_size, device=device) ** 3
    position = cubed if content_or_style == "content" else 1 - cubed
    return (position * NOISE_LEVELS).long().clamp(0, NOISE_LEVELS - 1)


def weighted_mean(per_element: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each item's mean loss (B,), its elements multiplied by ``weights`` (broadcast) when given."""
    if weights is not None:
        per_element = per_element * weights
    return per_element.flatten(1).mean(dim=1)


def module_names(module: torch.nn.Module, keep: Callable[[str, torch.nn.Module], bool]) -> list[str]:
    """Names of the sub-modules of ``module`` that ``keep`` accepts, in module order. A layer that
    carries a LoRA already (a training adapter) is judged by the layer it wraps, under its own name;
    the LoRA's own parts are never candidates."""
    names = []
    for name, child in module.named_modules():
        if hasattr(child, "base_layer") or PEFT_PARTS.search(name):
            continue  # the wrapper (its base_layer stands for it) or a LoRA's A, B, dropout
        name = name.removesuffix(".base_layer")
        if keep(name, child):
            names.append(name)
    return names


class Family(ABC):
    """One model family: how it loads, encodes text and images, computes its loss, samples and saves."""

    name: ClassVar[str]  # the config's `model.arch`
    pipeline_class_name: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"  # the pipeline attribute LoRA layers go into
    denoiser_class_name: ClassVar[str] = "UNet2DConditionModel"
    trains_text_encoders: ClassVar[bool] = False  # whether train_text_encoder adds LoRA layers to them
    vae_encode_dtype: ClassVar[torch.dtype | None] = None  # the VAE's own dtype unless a family needs another
    # How its LoRA files are keyed: "diffusers" (`transformer.<module>.lora_A/B`, alpha folded into
    # lora_B) or "kohya" (`lora_unet_<module>.lora_down/up` + `.alpha`), as ai-toolkit writes them.
    file_format: ClassVar[Literal["diffusers", "kohya"]]
    file_prefix: ClassVar[str] = "transformer."  # diffusers-format keys: `<file_prefix><module>.lora_A.weight`
    kohya_base_version: ClassVar[str]  # header `ss_base_model_version`
    modelspec_architecture: ClassVar[str]  # header `modelspec.architecture`
    # Kohya files: the key prefix of each text encoder's LoRA, by pipeline name.
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {}
    # The denoiser's repeated blocks, by class name: what ``compile`` compiles, one block at a time
    # (regional compilation: every block of a class shares one compiled graph, so it compiles in
    # seconds rather than minutes, and the LoRA layers inside are compiled with it).
    compiled_blocks: ClassVar[tuple[str, ...]] = ()
    # Whether its pipeline runs classifier-free guidance (two images a step) when guidance_scale > 1.
    classifier_free_guidance: ClassVar[bool] = True
    # Options its pipeline is loaded with beyond the dtype and location.
    load_options: ClassVar[dict[str, Any]] = {}
    # The published model whose shapes the memory plan counts when the model is not on the volume
    # yet (``training/shapes/<name>/``: its model_index.json and component configs).
    reference_model: ClassVar[str]

    def __init__(self, v_prediction: bool = False):
        self.v_prediction = v_prediction  # SD 1.5 / SDXL: learn v instead of epsilon

    # ---------------------------------------------------------------- what each family must say

    @abstractmethod
    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        """The names of the denoiser's modules that get LoRA layers (as ai-toolkit chooses them)."""

    def text_encoder_lora_targets(self, encoder: torch.nn.Module) -> list[str]:
        """The names of a text encoder's modules that get LoRA layers when text encoders train."""
        raise NotImplementedError(f"{self.name} keeps its text encoders frozen")

    @abstractmethod
    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        """Conditioning tensors for one caption (batch dim 1; with gradients when the caller enables them)."""

    @abstractmethod
    def training_scheduler(self, pipe):
        """The noise scheduler the loss draws timesteps from."""

    @abstractmethod
    def loss(self, pipe, denoiser: torch.nn.Module, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
        """The training loss of one batch (a scalar)."""

    @abstractmethod
    def activation_bytes(self, config: dict, width: int, height: int, checkpointing: bool) -> ActivationBytes:
        """What one ``width`` x ``height`` example's training step holds on the GPU beyond the weights, in
        bf16 (the denoiser's ``config`` as in its config.json): the memory plan's activation part."""

    # ---------------------------------------------------------------- shared behaviour, overridable

    def load(
        self,
        name_or_path: str,
        dtype: torch.dtype,
        cache_dir: str,
        revision: str | None = None,
        field: str = "model",
        shown: str | None = None,
        notes: list[str] | None = None,
        report: hub_fetch.Report | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        """The pipeline, or a ``model_load_failed`` error naming ``field`` and the model as the user
        wrote it (``shown``): not found, gated, offline, or a pipeline of another family. A hub model
        in no cache is downloaded first into ``cache_dir`` (``hub_fetch``: its bytes go to ``report``,
        a stall is retried); which cached copy was chosen, when the cache could not say, goes to
        ``notes``. A stop (``should_stop``, by default the job's) ends the download or the load within a second."""
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class_name)
        if HUB_ID.fullmatch(name_or_path):  # on the volume already (RunPod's model cache, an earlier run): no network
            cached = cached_snapshot(name_or_path, revision, notes) or hub_fetch.fetch(
                name_or_path, revision, DIFFUSERS_FILES, Path(cache_dir), field, report, should_stop
            )
            name_or_path, revision = str(cached), None
        options = {"dtype": dtype, "cache_dir": cache_dir, "revision": revision} | self.load_options
        watch_diffusers_loaders()
        try:
            with stopping.stoppable_load("loading the base model", should_stop):
                pipe = pipeline_class.from_pretrained(name_or_path, **options)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
            message = f"{field}: could not load {shown or name_or_path!r} ({reason})"
            raise FastBackendError(message, code=ErrorCode.MODEL_LOAD_FAILED) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def noise_like(self, latents: torch.Tensor, options: LossOptions) -> torch.Tensor:
        """Gaussian noise for ``latents`` (B, C, H, W), with ai-toolkit's noise offset for every model
        (toolkit/train_tools.py ``apply_noise_offset``): one random shift per image and channel,
        times ``noise_offset``, so the model can learn overall brightness."""
        noise = torch.randn_like(latents)
        if options.noise_offset:
            b, c = latents.shape[:2]
            noise = noise + options.noise_offset * torch.randn(b, c, 1, 1, device=latents.device, dtype=latents.dtype)
        return noise

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def trainable_text_encoders(self, pipe) -> dict[str, torch.nn.Module]:
        """Text encoders that can take a LoRA, by their pipeline name (none when the family keeps them frozen)."""
        if not self.trains_text_encoders:
            return {}
        names = ("text_encoder", "text_encoder_2")
        return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}

    def encoders(self, pipe) -> list[torch.nn.Module]:
        """Modules needed only to encode text and images (they leave the device after caching)."""
        candidates = (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), pipe.vae)
        return [module for module in candidates if module is not None]

    def snap_size(self, pipe, width: int, height: int) -> tuple[int, int]:
        """``width`` x ``height`` rounded down to sides the pipeline accepts."""
        multiple = self.pixel_multiple(pipe)
        return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)

    def latent_cell_pixels(self, pipe) -> int:
        """The side in pixels of one cell of the latents the loss sees (the face weights' grid)."""
        return pipe.vae_scale_factor

    def pixel_multiple(self, pipe) -> int:
        """Image sides must be a multiple of this for the VAE and the denoiser."""
        unet = self.denoiser(pipe)
        return pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_pixels(self, pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent mean and std (unscaled), to cache."""
        vae = pipe.vae
        own_dtype = vae.dtype
        dtype = self.vae_encode_dtype or own_dtype
        vae.to(dtype)
        try:
            dist = vae.encode(pixels.to(vae.device, dtype)).latent_dist
        finally:
            vae.to(own_dtype)
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def scale_latents(self, pipe, raw: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser expects them."""
        return raw * pipe.vae.config.scaling_factor

    def sample_kwargs(self, pipe, negative_prompt: str) -> dict:
        """What the pipeline call needs beyond the prompt."""
        return {"negative_prompt": negative_prompt or None}

    def checkpoint_warnings(self, pipe, shown: str) -> list[str]:
        """What to tell the user about the checkpoint itself (``shown`` as the config names it)."""
        return []

    def shared_lora_down(self, denoiser: torch.nn.Module) -> list[tuple[str, ...]]:
        """Groups of LoRA targets that share one ``lora_A``: layers the original model fuses into one
        (its files then hold one LoRA of the trained rank on the fused layer). None by default."""
        return []

    def file_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A diffusers-format file's tensors from the denoiser's peft-named LoRA weights (scale already
        folded into ``lora_B``): keyed ``<file_prefix><module>.lora_A/B.weight``."""
        return {f"{self.file_prefix}{key}": value for key, value in state.items()}

    def pipeline_guidance(self, guidance_scale: float) -> float:
        """The pipeline's guidance for a config's or request's ``guidance_scale`` (the usual CFG scale: 1 is none)."""
        return guidance_scale

    def guidance_arguments(self, guidance_scale: float) -> dict:
        """The pipeline call's guidance argument(s) for a config's or request's ``guidance_scale``."""
        return {"guidance_scale": self.pipeline_guidance(guidance_scale)}

    def guided(self, guidance_scale: float) -> bool:
        """Whether the pipeline renders a second, unconditional image each step (classifier-free guidance)."""
        return self.classifier_free_guidance and self.pipeline_guidance(guidance_scale) > 1

    def encode_for_sampling(self, pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
        """The pipeline call's prompt arguments, encoded now (cached before training, so that samples
        need no text encoder on the device); as the pipeline would encode them itself."""
        guided = self.guided(guidance_scale)
        embeds, negative = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, guided, negative_prompt or None)
        return {"prompt_embeds": embeds} | ({"negative_prompt_embeds": negative} if guided else {})


# diffusers' loading steps that ask for a stop before they run: a pipeline component, a weights
# file, one tensor. (module path, function name) as diffusers 0.3x lays them out.
LOADER_STEPS = (
    ("diffusers.pipelines.pipeline_utils", "load_sub_model"),
    ("diffusers.models.model_loading_utils", "load_state_dict"),
    ("diffusers.models.modeling_utils", "load_state_dict"),
    ("diffusers.models.model_loading_utils", "set_module_tensor_to_device"),
)


def watch_diffusers_loaders() -> None:
    """Have diffusers' loading steps call ``stopping.check_load`` first (once per process): its
    ``from_pretrained`` has no other place where a stop can end it cleanly."""
    import importlib

    for module_name, name in LOADER_STEPS:
        module = importlib.import_module(module_name)
        step = getattr(module, name)  # a missing name fails loudly: diffusers moved it
        if not getattr(step, "checks_stop", False):
            setattr(module, name, _checking(step))


def _checking(step: Callable) -> Callable:
    @functools.wraps(step)
    def checked(*args, **kwargs):
        stopping.check_load()
        return step(*args, **kwargs)

    checked.checks_stop = True  # type: ignore[attr-defined]
    return checked


def move_to(module: torch.nn.Module, device: torch.device | str, check: Callable[[], None]) -> torch.nn.Module:
    """``module.to(device)`` a block at a time, ``check`` between blocks: the weights of a model loaded
    from a network volume are read here (safetensors maps them), a minute for FLUX's transformer."""
    for block in _blocks(module):
        block.to(device)
        check()
    return module.to(device)  # what is left: the module's own tensors


def _blocks(module: torch.nn.Module):
    for child in module.children():
        yield from child.children() if isinstance(child, torch.nn.ModuleList) else (child,)
