"""FLUX.2 [klein] 4B and 9B (the base checkpoints) and FLUX.2 [dev]: double- and single-stream blocks over
the VAE's latents in 2x2 patches, conditioned on Qwen3's hidden states of layers 9, 18 and 27 side by
side (klein) or Mistral Small 3.1's of layers 10, 20 and 30 ([dev], which also embeds its guidance).

Its pipeline (diffusers' Flux2KleinPipeline) patchifies the VAE's latents to 4x the channels,
normalises them with the VAE's batch-norm statistics, feeds the transformer ``sigma`` (``t / 1000``)
with no guidance embedding, and steps with its output as FLUX.1 does: the target is the velocity
``noise - latents``. Captions are padded to 512 tokens by the pipeline, so all have one length.

Files are keyed as ai-toolkit keys them, with BFL's original module names: the diffusers model
has separate q, k and v projections where the original has one fused ``qkv``. ai-toolkit trains one
LoRA of the network's rank on that fused layer, so here q, k and v share one ``lora_A`` while
training (``shared_lora_down``) and are written as that one LoRA: the shared ``lora_A`` and the three
``lora_B`` stacked. That is the same product, exactly, and the form ComfyUI and ai-toolkit load as it
is and diffusers loads by copying ``lora_A`` to each projection and splitting ``lora_B`` in three.
"""

from __future__ import annotations

import torch

from fastbackend.config import PREFIX
from fastbackend.training.families.base import (
    ActivationBytes,
    Family,
    LossOptions,
    PerToken,
    TrainingBatch,
    linear_layers_under,
    noise_level_indices,
)
from fastbackend.training.families.flux import flow_loss, flux_training_scheduler, sigma_table

MAX_SEQUENCE = 512  # the pipeline pads every caption to this
# The LoRA's modules: every Linear of both kinds of block, as ai-toolkit targets them; the shared
# modulation layers, the embedders and the output layers stay frozen.
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
# diffusers' module names inside a double block -> BFL's; q, k, v of each stream are fused.
DOUBLE_BLOCK_NAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
SINGLE_BLOCK_NAMES = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
# What a step keeps for the backward pass, per token per hidden unit, in bf16 sizes: measured with
# devtools/memory.py on klein 4B's published shapes (3,072 wide, rank-16 LoRA, bf16 autocast), one and
# two blocks of each kind at 256 and 512 px with 128 caption tokens (double 28.7 and 27.6, single 25.7
# and 25.3). Not yet checked against a GPU's allocator.
KEPT = PerToken(
    per_block=(28.2, 25.5), outside=0.15, checkpointed_block=1.0, checkpointed_outside=1.15, largest_block=27.6
)


class Flux2Klein(Family):
    name = "flux2_klein_4b"
    pipeline_class_name = "Flux2KleinPipeline"
    denoiser_name = "transformer"
    denoiser_class_name = "Flux2Transformer2DModel"
    file_format = "diffusers"
    file_prefix = "diffusion_model."
    kohya_base_version = "flux2_klein"
    modelspec_architecture = "flux-2-klein/lora"
    reference_model = "black-forest-labs/FLUX.2-klein-base-4B"
    compiled_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
    classifier_free_guidance = True

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        return linear_layers_under(denoiser, BLOCKS)

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 latent patches

    def latent_cell_pixels(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # the loss sees the latents patched: one cell per 2x2 patch

    def activation_bytes(self, config: dict, width: int, height: int, checkpointing: bool) -> ActivationBytes:
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        tokens = (width // 16) * (height // 16) + MAX_SEQUENCE
        return KEPT.bytes(tokens, hidden, (config["num_layers"], config["num_single_layers"]), checkpointing)

    def encode_prompt(self, pipe, text: str) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(prompt=text, device=pipe.text_encoder.device, max_sequence_length=MAX_SEQUENCE)
        return {"prompt_embeds": embeds.float()}

    def scale_latents(self, pipe, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's latents in 2x2 patches, normalised by its batch-norm statistics (the pipeline's own)."""
        patched = pipe._patchify_latents(raw)
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(raw.device, raw.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(raw.device, raw.dtype)
        return (patched - mean) / std

    def sample_kwargs(self, pipe, negative_prompt: str) -> dict:
        return {}  # the pipeline guides against an empty prompt and takes no negative

    def encode_for_sampling(self, pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
        device = pipe.text_encoder.device
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=MAX_SEQUENCE)
        encoded = {"prompt_embeds": embeds}
        if self.guided(guidance_scale) and not pipe.config.is_distilled:
            negative, _ = pipe.encode_prompt(prompt="", device=device, max_sequence_length=MAX_SEQUENCE)
            encoded["negative_prompt_embeds"] = negative
        return encoded

    def training_scheduler(self, pipe):
        """ai-toolkit trains every FLUX.2 with one fixed scheduler, FLUX.1-dev's settings, whatever the
        checkpoint's own (its flux2_model.py scheduler_config). For ``timestep_type: shift`` that gives
        mu linear in the patched latents' token count, 0.5 at 256 to 1.15 at 4,096 (1024 px), not the
        pipeline's ``compute_empirical_mu``, which also depends on the number of inference steps."""
        return flux_training_scheduler()

    def checkpoint_warnings(self, pipe, shown: str) -> list[str]:
        if not getattr(pipe.config, "is_distilled", False):
            return []
        return [
            f"{PREFIX}.model.name_or_path: {shown} is a step-distilled FLUX.2 [klein]; a LoRA trained on it "
            f"works against its distillation, so ai-toolkit trains the base checkpoints ({self.reference_model})"
        ]

    def shared_lora_down(self, denoiser: torch.nn.Module) -> list[tuple[str, ...]]:
        blocks = range(len(denoiser.transformer_blocks))
        return [
            tuple(f"transformer_blocks.{i}.{part}" for part in parts) for i in blocks for parts in FUSED_QKV.values()
        ]

    def file_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.file_prefix + key: value for key, value in to_original_names(state).items()}

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        latents = batch.latents  # (B, 4C, H/16, W/16): patched and normalised
        b, _, h, w = latents.shape
        noise = self.noise_like(latents, options)
        index = noise_level_indices(b, options.content_or_style, latents.device)
        sigmas = sigma_table(options, image_seq_len=h * w, device=latents.device)[index]
        s = sigmas.view(b, 1, 1, 1).to(latents.dtype)
        noisy = Flux2KleinPipeline._pack_latents((1 - s) * latents + s * noise)
        text = batch.cond["prompt_embeds"]
        # FLUX.2 [dev] embeds its guidance: trained at 1, as ai-toolkit (train.cfg_scale's default).
        guidance = torch.ones(b, device=latents.device) if denoiser.config.guidance_embeds else None
        prediction = denoiser(
            hidden_states=noisy,
            timestep=sigmas.to(latents.dtype),
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(latents.device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device),
            return_dict=False,
        )[0]
        target = Flux2KleinPipeline._pack_latents(noise - latents)
        weights = None
        if batch.loss_weights is not None:  # one per patch (latent_cell_pixels), on each of its channels
            weights = Flux2KleinPipeline._pack_latents(batch.loss_weights.expand(-1, latents.shape[1], -1, -1))
        return flow_loss(prediction, target, weights, options, index)


class Flux2Klein9B(Flux2Klein):
    name = "flux2_klein_9b"
    reference_model = "black-forest-labs/FLUX.2-klein-base-9B"


class Flux2Dev(Flux2Klein):
    """FLUX.2 [dev]: the same transformer, larger, with a guidance embedding (so no CFG pass), and Mistral
    Small 3.1's hidden states of layers 10, 20 and 30 as captions."""

    name = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    kohya_base_version = "flux2_dev"
    modelspec_architecture = "flux-2-dev/lora"
    reference_model = "black-forest-labs/FLUX.2-dev"
    classifier_free_guidance = False  # guidance_scale is embedded


def to_original_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-named FLUX.2 LoRA (``transformer_blocks.N.attn.to_q.lora_A.weight``, scale already
    in ``lora_B``) under BFL's names, each stream's q, k and v (one shared ``lora_A``) fused into one
    ``qkv`` LoRA of the same rank."""
    state, renamed = dict(state), {}
    blocks = {key.split(".")[1] for key in state if key.startswith("transformer_blocks.")}
    for block in sorted(blocks, key=int):
        inside = f"transformer_blocks.{block}."
        for fused, parts in FUSED_QKV.items():
            a = [state.pop(f"{inside}{part}.lora_A.weight") for part in parts]
            if not all(torch.equal(a[0], other) for other in a[1:]):  # a bug, never the user's doing
                raise ValueError(f"{inside}{fused}: q, k and v do not share one lora_A")
            renamed[f"double_blocks.{block}.{fused}.lora_A.weight"] = a[0]
            b = [state.pop(f"{inside}{part}.lora_B.weight") for part in parts]
            renamed[f"double_blocks.{block}.{fused}.lora_B.weight"] = torch.cat(b)
    for key, value in state.items():
        kind, block, rest = key.split(".", 2)
        module, tail = rest.rsplit(".lora_", 1)
        names = DOUBLE_BLOCK_NAMES if kind == "transformer_blocks" else SINGLE_BLOCK_NAMES
        prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        renamed[f"{prefix}.{block}.{names[module]}.lora_{tail}"] = value
    return renamed
