"""The three architectures: how each loads, encodes text and images, computes its loss, and samples.

Each ``Arch`` wraps a diffusers pipeline loaded by ``name_or_path`` (a hub id, cached under
the data root, or a local folder). The trainer only talks to this interface:

* ``encode_prompt(pipe, text)`` -> conditioning tensors for one caption (batch dim 1; with
  gradients when the caller enables them, for text-encoder LoRA);
* ``encode_pixels(pipe, pixels)`` -> the VAE's latent mean and std (unscaled), to cache;
* ``scale_latents(pipe, raw)`` -> latents as the denoiser expects them;
* ``loss(pipe, denoiser, batch, options)`` -> the training loss of one ``Batch``;
* ``sample_kwargs(pipe, negative_prompt)`` -> what the pipeline call needs beyond the prompt.

SD 1.5 and SDXL learn the scheduler's epsilon (or v) target at uniform timesteps; SDXL adds
its size/crop conditioning. FLUX learns the flow-matching velocity ``noise - latents`` at
sigmas drawn by ``timestep_type`` and, for FLUX.1-dev, with the guidance embedding at 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastbackend import settings
from fastbackend.errors import ErrorCode, FastBackendError

# Fixed for FLUX.1-dev by its authors; schnell was distilled with 256.
FLUX_DEV_MAX_SEQUENCE = 512
FLUX_SCHNELL_MAX_SEQUENCE = 256
# LoRA targets: attention and feed-forward projections of every transformer block, as the
# diffusers example scripts and ai-toolkit target them. Regexes, matched against full names.
UNET_TARGETS = r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.(0\.proj|2)"
# CLIP text encoders: the attention projections of every layer.
TEXT_ENCODER_TARGETS = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
FLUX_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)


@dataclass
class Batch:
    """One training batch from one aspect bucket. ``sizes``: per image (orig_h, orig_w, top, left, h, w)."""

    latents: torch.Tensor  # (B, C, H/f, W/f), scaled for the denoiser
    cond: dict[str, torch.Tensor]  # caption conditioning, batch dim B
    sizes: torch.Tensor  # (B, 6)


class Arch:
    name: str
    pipeline_class_name: str
    lora_targets: str
    denoiser_name = "unet"
    denoiser_class_name = "UNet2DConditionModel"

    def load(
        self,
        name_or_path: str,
        dtype: torch.dtype,
        cache_dir: str,
        quantize: bool = False,
        revision: str | None = None,
        field: str = "model",
        shown: str | None = None,
    ):
        """The pipeline, or a ``model_load_failed`` error naming ``field`` and the model as the user
        wrote it (``shown``): not found, gated, offline, or a pipeline of another architecture."""
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class_name)
        # HF_TOKEN (gated models) is passed, never logged or returned.
        options = dict(dtype=dtype, cache_dir=cache_dir, revision=revision, token=settings.HF_TOKEN.get())
        try:
            if quantize:
                options[self.denoiser_name] = self._load_quantized(name_or_path, options)
            pipe = pipeline_class.from_pretrained(name_or_path, **options)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
            message = f"{field}: could not load {shown or name_or_path!r} ({reason})"
            raise FastBackendError(message, code=ErrorCode.MODEL_LOAD_FAILED) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _load_quantized(self, name_or_path: str, options: dict):
        """The denoiser with 8-bit base weights (bitsandbytes); LoRA layers stay in full precision."""
        import diffusers

        model_class = getattr(diffusers, self.denoiser_class_name)
        quantization = diffusers.BitsAndBytesConfig(load_in_8bit=True)
        return model_class.from_pretrained(
            name_or_path, subfolder=self.denoiser_name, quantization_config=quantization, **options
        )

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def trainable_text_encoders(self, pipe) -> dict[str, torch.nn.Module]:
        """Text encoders that can take a LoRA, by their pipeline name (none for FLUX, as in ai-toolkit)."""
        names = ("text_encoder", "text_encoder_2")
        return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}

    def encoders(self, pipe) -> list[torch.nn.Module]:
        """Modules needed only to encode text and images (they leave the device after caching)."""
        return [
            m
            for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), pipe.vae)
            if m is not None
        ]

    def snap_size(self, pipe, width: int, height: int) -> tuple[int, int]:
        """``width`` x ``height`` rounded down to sides the pipeline accepts."""
        multiple = self.pixel_multiple(pipe)
        return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)

    def pixel_multiple(self, pipe) -> int:
        """Image sides must be a multiple of this for the VAE and the denoiser."""
        unet = self.denoiser(pipe)
        return pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_pixels(self, pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def scale_latents(self, pipe, raw: torch.Tensor) -> torch.Tensor:
        return raw * pipe.vae.config.scaling_factor

    def sample_kwargs(self, pipe, negative_prompt: str) -> dict:
        return {"negative_prompt": negative_prompt or None}


class SD15(Arch):
    name = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    lora_targets = UNET_TARGETS

    def __init__(self, v_prediction: bool = False):
        self.v_prediction = v_prediction

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(text, pipe.text_encoder.device, 1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float()}

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.v_prediction:
            scheduler.register_to_config(prediction_type="v_prediction")
        return scheduler

    def unet_kwargs(self, batch: Batch) -> dict:
        return {}

    def loss(self, pipe, denoiser, batch: Batch, options: "LossOptions") -> torch.Tensor:
        scheduler = options.scheduler
        latents = batch.latents
        noise = torch.randn_like(latents)
        if options.noise_offset:
            # Per-channel offset: lets the model learn overall brightness (Guttenberg's noise offset).
            noise += options.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
        prediction = denoiser(
            noisy, timesteps, batch.cond["prompt_embeds"], return_dict=False, **self.unet_kwargs(batch)
        )[0]
        per_item = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if options.min_snr_gamma:
            per_item = per_item * _min_snr_weights(scheduler, timesteps, options.min_snr_gamma)
        return per_item.mean()


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    weights = clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return weights.float()


class SDXL(SD15):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            text, device=pipe.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def unet_kwargs(self, batch: Batch) -> dict:
        # SDXL's micro-conditioning: original size, crop corner and target size of each image.
        time_ids = batch.sizes.to(batch.latents.device, batch.latents.dtype)
        return {"added_cond_kwargs": {"text_embeds": batch.cond["pooled"], "time_ids": time_ids}}


class Flux(Arch):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    lora_targets = FLUX_TARGETS
    denoiser_name = "transformer"
    denoiser_class_name = "FluxTransformer2DModel"

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed in 2x2 patches

    def trainable_text_encoders(self, pipe) -> dict[str, torch.nn.Module]:
        return {}

    def max_sequence_length(self, pipe) -> int:
        guided = self.denoiser(pipe).config.guidance_embeds
        return FLUX_DEV_MAX_SEQUENCE if guided else FLUX_SCHNELL_MAX_SEQUENCE

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            text, prompt_2=None, device=pipe.text_encoder.device, max_sequence_length=self.max_sequence_length(pipe)
        )
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def scale_latents(self, pipe, raw: torch.Tensor) -> torch.Tensor:
        return (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    def sample_kwargs(self, pipe, negative_prompt: str) -> dict:
        return {"max_sequence_length": self.max_sequence_length(pipe)}

    def training_scheduler(self, pipe):
        return pipe.scheduler

    def loss(self, pipe, denoiser, batch: Batch, options: "LossOptions") -> torch.Tensor:
        from diffusers import FluxPipeline

        latents = batch.latents
        b, c, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigmas = flux_sigmas(b, options.timestep_type, options.scheduler.config.get("shift", 3.0), latents.device)
        s = sigmas.view(b, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        # (B, C, H, W) -> (B, H/2 * W/2, 4C): the transformer sees 2x2 patches as tokens.
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text = batch.cond["prompt_embeds"]
        text_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = torch.ones(b, device=latents.device) if denoiser.config.guidance_embeds else None
        prediction = denoiser(
            hidden_states=packed,
            timestep=sigmas.to(latents.dtype),
            guidance=guidance,
            pooled_projections=batch.cond["pooled"],
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - latents, b, c, h, w)
        return F.mse_loss(prediction.float(), target.float())


def flux_sigmas(batch_size: int, timestep_type: str, shift: float, device) -> torch.Tensor:
    """Noise levels in (0, 1): logit-normal ("sigmoid"), uniform ("linear"), or uniform shifted
    towards noise ("shift", as FLUX's scheduler does at inference)."""
    if timestep_type == "sigmoid":
        return torch.sigmoid(torch.randn(batch_size, device=device))
    uniform = torch.rand(batch_size, device=device)
    if timestep_type == "shift":
        return shift * uniform / (1 + (shift - 1) * uniform)
    return uniform


@dataclass
class LossOptions:
    scheduler: object
    timestep_type: str = "sigmoid"
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None


def arch_for(name: str, v_prediction: bool = False) -> Arch:
    return {"sd15": SD15(v_prediction), "sdxl": SDXL(v_prediction), "flux": Flux()}[name]
