"""Qwen-Image: a dual-stream (image and caption) transformer over 2x2 latent patches, with Qwen2.5-VL
caption features and a video-style VAE used one frame at a time.

Its pipeline (diffusers' QwenImagePipeline) feeds the transformer ``sigma`` (``t / 1000``) and steps
with its output as FLUX does, so the target is FLUX's velocity ``noise - latents``. Captions are the
text encoder's last hidden states for the caption inside the pipeline's chat template, the
template's 34 leading tokens dropped, each as long as its tokens (padded with a mask in a batch).
Latents are normalised per channel by the VAE's ``latents_mean`` / ``latents_std``. Noise levels are
drawn as for FLUX.1 and, for ``timestep_type: shift``, shifted by the scheduler's dynamic shift
(0.5 at 256 tokens to 0.9 at 8,192 in the published scheduler), then stretched to end on its
``shift_terminal`` (0.02), as at inference and in ai-toolkit. Guidance is the pipeline's
``true_cfg_scale`` against an empty negative prompt: the model has no guidance embedding.
"""

from __future__ import annotations

import torch

from fastbackend.training.families.base import (
    ActivationBytes,
    Family,
    LossOptions,
    PerToken,
    TrainingBatch,
    linear_layers_under,
    noise_level_indices,
)
from fastbackend.training.families.flux import flow_loss, packed_weights, pipeline_scheduler, sigma_table

# The LoRA's modules: every Linear of the transformer blocks (both streams' attention projections,
# MLPs and modulation), as ai-toolkit targets QwenImageTransformerBlock; embedders and the output
# layers stay frozen.
BLOCKS = "transformer_blocks."
TEXT_TOKENS = 256  # the memory plan's caption length (captions here are far shorter than the 1,024 allowed)
# What a step keeps for the backward pass, per token per hidden unit, in bf16 sizes: measured with
# devtools/memory.py on the published shapes (3,072 wide, rank-16 LoRA, bf16 autocast), one and two
# blocks deep at 256 and 512 px with 128 caption tokens (31.1 and 29.8 a block). Not yet checked
# against a GPU's allocator.
# Checkpointed outside the blocks: 0.54 to 0.97 of a unit measured, 0.75 its middle.
KEPT = PerToken(per_block=(30.5,), outside=0.66, checkpointed_block=1.0, checkpointed_outside=0.75, largest_block=31.1)
NO_NEGATIVE = " "  # the pipeline guides only against a negative prompt; an empty one is a space


class QwenImage(Family):
    name = "qwen_image"
    pipeline_class_name = "QwenImagePipeline"
    denoiser_name = "transformer"
    denoiser_class_name = "QwenImageTransformer2DModel"
    file_format = "diffusers"
    file_prefix = "diffusion_model."  # ai-toolkit's keys for Qwen-Image; diffusers and ComfyUI read them
    kohya_base_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    reference_model = "Qwen/Qwen-Image"
    compiled_blocks = ("QwenImageTransformerBlock",)
    classifier_free_guidance = True

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        return linear_layers_under(denoiser, BLOCKS)

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 latent patches

    def activation_bytes(self, config: dict, width: int, height: int, checkpointing: bool) -> ActivationBytes:
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        tokens = (width // 16) * (height // 16) + TEXT_TOKENS
        return KEPT.bytes(tokens, hidden, (config["num_layers"],), checkpointing)

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(text, device=pipe.text_encoder.device)
        mask = torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask
        return {"prompt_embeds": embeds.float(), "prompt_mask": mask.float()}

    @torch.no_grad()
    def encode_pixels(self, pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = pipe.vae  # a video VAE: images are clips of one frame
        dist = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist
        return dist.mean.squeeze(2).float().cpu(), dist.std.squeeze(2).float().cpu()

    def scale_latents(self, pipe, raw: torch.Tensor) -> torch.Tensor:
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean, device=raw.device, dtype=raw.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=raw.device, dtype=raw.dtype).view(1, -1, 1, 1)
        return (raw - mean) / std

    def guidance_arguments(self, guidance_scale: float) -> dict:
        return {"true_cfg_scale": guidance_scale}

    def sample_kwargs(self, pipe, negative_prompt: str) -> dict:
        return {"negative_prompt": negative_prompt or NO_NEGATIVE}

    def encode_for_sampling(self, pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
        device = pipe.text_encoder.device
        embeds, mask = pipe.encode_prompt(prompt, device=device)
        encoded = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if self.guided(guidance_scale):
            negative, negative_mask = pipe.encode_prompt(negative_prompt or NO_NEGATIVE, device=device)
            encoded |= {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask}
        return {key: value for key, value in encoded.items() if value is not None}

    def training_scheduler(self, pipe):
        return pipeline_scheduler(pipe)

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        latents = batch.latents
        b, c, h, w = latents.shape
        noise = self.noise_like(latents, options)
        index = noise_level_indices(b, options.content_or_style, latents.device)
        sigmas = sigma_table(options, image_seq_len=h * w // 4, device=latents.device)[index]
        s = sigmas.view(b, 1, 1, 1).to(latents.dtype)
        noisy = QwenImagePipeline._pack_latents((1 - s) * latents + s * noise, b, c, h, w)
        prediction = denoiser(
            hidden_states=noisy,
            timestep=sigmas.to(latents.dtype),
            encoder_hidden_states=batch.cond["prompt_embeds"],
            encoder_hidden_states_mask=batch.cond["prompt_mask"].long(),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        target = QwenImagePipeline._pack_latents(noise - latents, b, c, h, w)
        weights = None if batch.loss_weights is None else packed_weights(batch.loss_weights, latents.shape)
        return flow_loss(prediction, target, weights, options, index)
