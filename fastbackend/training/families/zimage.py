"""Z-Image (Tongyi-MAI): a single-stream transformer over 2x2 latent patches, with Qwen3 caption features.

Its pipeline (diffusers' ZImagePipeline) feeds the transformer ``(1000 - t) / 1000``, that is
``1 - sigma``, and negates what it returns before the Euler step: the transformer predicts
``latents - noise``, the negative of FLUX's velocity. Captions are Qwen3's second-to-last hidden
states for the caption in a chat turn, one row per real token (no padding), so a batch of
captions of different lengths is a list; here they are cached padded, with a mask, and unpadded
for the step. Noise levels are drawn as for FLUX.1 (``timestep_type``, ``content_or_style``) and
shifted by the scheduler's fixed ``shift`` (3.0 in the published scheduler).
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
from fastbackend.training.families.flux import flow_loss, pipeline_scheduler, sigma_table

MAX_SEQUENCE = 512  # the pipeline's default caption length
# The LoRA's modules: every Linear of the main transformer blocks (``layers.N``: attention, feed
# forward, modulation), as ai-toolkit targets its ZImageTransformerBlock; the refiners that prepare
# the image and caption streams, the embedders and the final layer stay frozen.
BLOCKS = "layers."
# What a step keeps for the backward pass, per token per hidden unit, as multiples of bf16's size:
# measured with devtools/memory.py on the published shapes (3,840 wide, rank-16 LoRA, bf16 autocast)
# one and two blocks deep at 256 and 512 px with 128 caption tokens (43.7 and 43.1 a block; the
# refiners before the first LoRA layer keep nothing). Not yet checked against a GPU's allocator.
# Checkpointed outside the blocks: 2.4 to 3.1 of a unit measured, by caption length.
KEPT = PerToken(per_block=(43.4,), outside=0.0, checkpointed_block=1.06, checkpointed_outside=2.7, largest_block=40.8)


class ZImage(Family):
    name = "zimage"
    pipeline_class_name = "ZImagePipeline"
    denoiser_name = "transformer"
    denoiser_class_name = "ZImageTransformer2DModel"
    file_format = "diffusers"
    file_prefix = "diffusion_model."  # ai-toolkit's keys for Z-Image; diffusers and ComfyUI read them
    kohya_base_version = "zimage"
    modelspec_architecture = "z-image/lora"
    reference_model = "Tongyi-MAI/Z-Image-Turbo"
    compiled_blocks = ("ZImageTransformerBlock",)
    classifier_free_guidance = True

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        return linear_layers_under(denoiser, BLOCKS)

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 latent patches

    def activation_bytes(self, config: dict, width: int, height: int, checkpointing: bool) -> ActivationBytes:
        tokens = (width // 16) * (height // 16) + MAX_SEQUENCE  # captions are shorter: an upper bound
        return KEPT.bytes(tokens, config["dim"], (config["n_layers"],), checkpointing)

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        (embeds,) = pipe._encode_prompt([text], device=pipe.text_encoder.device, max_sequence_length=MAX_SEQUENCE)
        mask = torch.ones(1, embeds.shape[0], device=embeds.device)
        return {"prompt_embeds": embeds.float().unsqueeze(0), "prompt_mask": mask}

    def scale_latents(self, pipe, raw: torch.Tensor) -> torch.Tensor:
        return (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    def sample_kwargs(self, pipe, negative_prompt: str) -> dict:
        return {"negative_prompt": negative_prompt or None}

    def pipeline_guidance(self, guidance_scale: float) -> float:
        """ZImagePipeline steps with ``cond + g * (cond - uncond)``: the usual scale minus 1 (as ai-toolkit
        passes it), so guidance 1 (Z-Image-Turbo's) is a single pass."""
        return max(0.0, guidance_scale - 1)

    def guided(self, guidance_scale: float) -> bool:
        return self.pipeline_guidance(guidance_scale) > 0  # the pipeline's own rule

    def encode_for_sampling(self, pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
        guided = self.guided(guidance_scale)
        embeds, negative = pipe.encode_prompt(
            prompt,
            device=pipe.text_encoder.device,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
            max_sequence_length=MAX_SEQUENCE,
        )
        return {"prompt_embeds": embeds} | ({"negative_prompt_embeds": negative} if guided else {})

    def training_scheduler(self, pipe):
        return pipeline_scheduler(pipe)

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
        latents = batch.latents
        b, _, h, w = latents.shape
        noise = self.noise_like(latents, options)
        index = noise_level_indices(b, options.content_or_style, latents.device)
        sigmas = sigma_table(options, image_seq_len=h * w // 4, device=latents.device)[index]
        s = sigmas.view(b, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        embeds, mask = batch.cond["prompt_embeds"], batch.cond["prompt_mask"].bool()
        captions = [embeds[i][mask[i]] for i in range(b)]
        # One (C, frames=1, H, W) image per item, as the pipeline passes them.
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), (1 - sigmas).to(latents.dtype), captions, return_dict=False)
        prediction = torch.stack(out[0]).squeeze(2)
        target = latents - noise  # the pipeline steps with minus the transformer's output
        return flow_loss(prediction, target, batch.loss_weights, options, index)
