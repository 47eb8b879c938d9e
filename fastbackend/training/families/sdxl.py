"""SDXL: SD 1.5's objective with two text encoders and size/crop micro-conditioning."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fastbackend.training.families.base import PerUnit, TrainingBatch
from fastbackend.training.families.sd15 import SD15


class SDXL(SD15):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    reference_model = "stabilityai/stable-diffusion-xl-base-1.0"
    load_options: ClassVar[dict[str, Any]] = {}  # no safety checker to leave out
    # As SD 1.5's, measured at 64x64 and 96x96 latents (512 and 768 px).
    kept: ClassVar[dict[bool, PerUnit]] = {False: PerUnit(146e6, 461_650), True: PerUnit(1.7e6, 35_017)}
    largest_block: ClassVar[PerUnit] = PerUnit(1.4e6, 10_328)
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    # SDXL's VAE overflows in fp16 (NaN latents): it encodes in fp32, as diffusers' SDXL example
    # scripts do. ai-toolkit encodes in the training dtype; here the two differ on purpose.
    vae_encode_dtype = torch.float32

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            text, device=pipe.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def encode_for_sampling(self, pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
        guided = self.guided(guidance_scale)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt,
            device=pipe.text_encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
        )
        arguments = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guided:
            arguments |= {"negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}
        return arguments

    def unet_kwargs(self, batch: TrainingBatch) -> dict:
        # SDXL's micro-conditioning: original size, crop corner and target size of each image.
        time_ids = batch.sizes.to(batch.latents.device, batch.latents.dtype)
        return {"added_cond_kwargs": {"text_embeds": batch.cond["pooled"], "time_ids": time_ids}}
