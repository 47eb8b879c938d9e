"""Stable Diffusion 1.5: a UNet that learns the scheduler's epsilon (or v) target at uniform timesteps."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from fastbackend.training.families.base import Family, LossOptions, TrainingBatch

# Attention and feed-forward projections of every transformer block, as the diffusers example
# scripts and ai-toolkit target them. Regexes, matched against full module names.
UNET_TARGETS = r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.(0\.proj|2)"
# CLIP text encoders: the attention projections of every layer.
CLIP_TARGETS = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"


class SD15(Family):
    name = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    lora_targets = UNET_TARGETS
    text_encoder_targets: ClassVar[str | None] = CLIP_TARGETS
    file_format = "kohya"
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"

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

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
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
            per_item = per_item * min_snr_weights(scheduler, timesteps, options.min_snr_gamma)
        return per_item.mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    weights = clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return weights.float()
