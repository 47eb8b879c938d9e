"""Stable Diffusion 1.5: a UNet that learns the scheduler's epsilon (or v) target at uniform timesteps."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fastbackend.training.families.base import (
    NOISE_LEVELS,
    ActivationBytes,
    Family,
    LossOptions,
    PerUnit,
    TrainingBatch,
    module_names,
    noise_level_indices,
    weighted_mean,
)

# ai-toolkit's UNet LoRA (toolkit/lora_special.py with kohya's target classes): every Linear and 1x1
# Conv2d inside the UNet's Transformer2DModel blocks, which diffusers names `...attentions.<i>.`:
# proj_in, attn1/attn2 projections, the feed-forward layers, proj_out. ResNet blocks stay frozen.
TRANSFORMER_BLOCK = re.compile(r"(^|\.)attentions\.\d+\.")
# ...and in CLIP text encoders every Linear of the attention and MLP (CLIPAttention, CLIPMLP).
CLIP_LAYER = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def is_linear_or_pointwise_conv(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)


class SD15(Family):
    name = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    trains_text_encoders = True
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te_"}
    file_format = "kohya"
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    reference_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    compiled_blocks = ("BasicTransformerBlock", "ResnetBlock2D")
    # No safety checker (ai-toolkit loads none either): 0.3B parameters on the GPU, and samples of a
    # person blacked out as false positives.
    load_options: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    # bf16 bytes per latent pixel of one example, kept for the backward pass, without and with
    # gradient checkpointing, and the largest block; measured with devtools/memory.py
    # (benchmarks/activation_memory.py) on the published UNet with a rank-16 LoRA at 48x48 and
    # 64x64 latents (384 and 512 px). Not yet checked against a GPU's allocator.
    kept: ClassVar[dict[bool, PerUnit]] = {False: PerUnit(20.5e6, 258_476), True: PerUnit(1.7e6, 48_172)}
    largest_block: ClassVar[PerUnit] = PerUnit(0.6e6, 20_812)

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        return module_names(
            denoiser, lambda name, m: bool(TRANSFORMER_BLOCK.search(name)) and is_linear_or_pointwise_conv(m)
        )

    def activation_bytes(self, config: dict, width: int, height: int, checkpointing: bool) -> ActivationBytes:
        pixels = (width // 8) * (height // 8)
        return ActivationBytes(kept=self.kept[checkpointing].at(pixels), largest_block=self.largest_block.at(pixels))

    def text_encoder_lora_targets(self, encoder: torch.nn.Module) -> list[str]:
        return module_names(encoder, lambda name, m: bool(CLIP_LAYER.search(name)) and isinstance(m, torch.nn.Linear))

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(text, pipe.text_encoder.device, 1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float()}

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.v_prediction:
            scheduler.register_to_config(prediction_type="v_prediction")
        return scheduler

    def unet_kwargs(self, batch: TrainingBatch) -> dict:
        """Extra conditioning the UNet takes (none for SD 1.5)."""
        return {}

    def timesteps(self, batch_size: int, scheduler, content_or_style: str, device) -> torch.Tensor:
        """DDPM timesteps: uniform, or biased to high ("content") or low ("style") noise."""
        steps = scheduler.config.num_train_timesteps
        if content_or_style == "balanced":  # ai-toolkit: indices 1..997 of the 999..0 table
            return torch.randint(2, steps - 1, (batch_size,), device=device)
        # The index counts from the noisiest level down, as ai-toolkit's table does.
        index = noise_level_indices(batch_size, content_or_style, device)
        return (steps - 1 - index * steps // NOISE_LEVELS).clamp(0, steps - 1)

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
        scheduler = options.scheduler
        latents = batch.latents
        noise = self.noise_like(latents, options)
        timesteps = self.timesteps(latents.shape[0], scheduler, options.content_or_style, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
        prediction = denoiser(
            noisy, timesteps, batch.cond["prompt_embeds"], return_dict=False, **self.unet_kwargs(batch)
        )[0]
        per_item = weighted_mean(F.mse_loss(prediction.float(), target.float(), reduction="none"), batch.loss_weights)
        if options.min_snr_gamma:
            per_item = per_item * min_snr_weights(scheduler, timesteps, options.min_snr_gamma)
        return per_item.mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    weights = clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return weights.float()
