"""FLUX.1 (dev and schnell): a transformer that learns the flow-matching velocity ``noise - latents``.

Sigmas are drawn by ``timestep_type``; FLUX.1-dev (``guidance_embeds``) takes its guidance
embedding at 1 while training. Its text encoders stay frozen, as in ai-toolkit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbackend.training.families.base import Family, LossOptions, TrainingBatch

# Fixed for FLUX.1-dev by its authors; schnell was distilled with 256.
FLUX_DEV_MAX_SEQUENCE = 512
FLUX_SCHNELL_MAX_SEQUENCE = 256
# Attention and feed-forward projections of both block kinds, image and text streams.
FLUX_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)


class Flux(Family):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    lora_targets = FLUX_TARGETS
    denoiser_name = "transformer"
    denoiser_class_name = "FluxTransformer2DModel"
    file_format = "diffusers"
    kohya_base_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed in 2x2 patches

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

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
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
