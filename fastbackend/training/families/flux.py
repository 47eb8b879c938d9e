"""FLUX.1 (dev and schnell): a transformer that learns the flow-matching velocity ``noise - latents``.

Noise levels (sigmas) are drawn as ai-toolkit draws them (its CustomFlowMatchEulerDiscreteScheduler):
a table of 1000 levels by ``timestep_type``, an index into it by ``content_or_style``; with
``linear_timesteps`` the loss is weighted by a bell curve over the table, with ``timestep_type:
weighted`` by ai-toolkit's measured weights per level (a fit of them: ``WEIGHTED_KNOTS``). FLUX.1-dev
(``guidance_embeds``) takes its guidance embedding at 1 while training. Its text encoders stay
frozen, as in ai-toolkit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastbackend.training.families.base import (
    NOISE_LEVELS,
    ActivationBytes,
    Family,
    LossOptions,
    PerToken,
    TrainingBatch,
    module_names,
    noise_level_indices,
    weighted_mean,
)

# Fixed for FLUX.1-dev by its authors; schnell was distilled with 256.
FLUX_DEV_MAX_SEQUENCE = 512
FLUX_SCHNELL_MAX_SEQUENCE = 256
# ai-toolkit's FLUX LoRA (transformer_only, its default): every Linear inside both kinds of
# transformer block, the modulation layers (norm1.linear, norm1_context.linear, norm.linear) that
# carry the timestep, text and guidance conditioning included; the embedders and the final
# norm_out / proj_out stay frozen.
FLUX_BLOCKS = "transformer_blocks"  # matches single_transformer_blocks too
# What a FLUX step keeps for the backward pass, per token (image and text) per hidden unit, as
# multiples of the weight dtype's size; measured with devtools/memory.py (benchmarks/activation_memory.py)
# on the published shapes (3,072 hidden, rank-16 LoRA, bf16 autocast) at 1,024 + 128 tokens, and
# linear in the token count within 7% from 320 tokens. Not yet checked against a GPU's allocator.
# Checkpointed, a block keeps its inputs (the image and text tokens); the largest block is a double one.
KEPT = PerToken(
    per_block=(27.8, 24.4), outside=0.24, checkpointed_block=1.0, checkpointed_outside=1.1, largest_block=27.9
)
# The noise schedule training uses, whatever the checkpoint's own (FLUX.1-dev's scheduler_config.json).
FLUX_TRAINING_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# train.timestep_type: weighted. ai-toolkit multiplies each item's loss by a weight per noise level, a
# table of 1000 values it measured on Flex.1-alpha (its default_weighing_scheme; index 0 the most noise).
# This is our own fit of that table, not the table: a piecewise-linear curve through these values at
# indices 0, 25, ..., 975 and 999, each the least-squares best over the table, rounded to 3 decimals;
# scaled to mean 1 over the 1000 levels, it is within 0.003 of the table in root mean square and 0.035
# at most (index 13, where the table climbs steeply). devtools/fit_timestep_weights.py redoes the fit.
WEIGHTED_KNOT_SPACING = 25
WEIGHTED_KNOTS = (
    0.909, 1.237, 1.379, 1.476, 1.506, 1.522, 1.510, 1.481, 1.442, 1.400,
    1.355, 1.310, 1.263, 1.218, 1.172, 1.126, 1.082, 1.040, 1.000, 0.962,
    0.925, 0.891, 0.859, 0.831, 0.805, 0.782, 0.762, 0.745, 0.731, 0.721,
    0.715, 0.713, 0.716, 0.721, 0.729, 0.734, 0.719, 0.669, 0.583, 0.488,
    0.436,
)  # fmt: skip


class Flux(Family):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_name = "transformer"
    denoiser_class_name = "FluxTransformer2DModel"
    file_format = "diffusers"
    kohya_base_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    reference_model = "black-forest-labs/FLUX.1-dev"
    compiled_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    classifier_free_guidance = False  # FLUX.1 embeds its guidance

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        return module_names(denoiser, lambda name, m: FLUX_BLOCKS in name and isinstance(m, torch.nn.Linear))

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed in 2x2 patches

    def activation_bytes(self, config: dict, width: int, height: int, checkpointing: bool) -> ActivationBytes:
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        text = FLUX_DEV_MAX_SEQUENCE if config.get("guidance_embeds") else FLUX_SCHNELL_MAX_SEQUENCE
        tokens = (width // 16) * (height // 16) + text  # 2x2 patches of 8x latents
        return KEPT.bytes(tokens, hidden, (config["num_layers"], config["num_single_layers"]), checkpointing)

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

    def encode_for_sampling(self, pipe, prompt: str, negative_prompt: str, guidance_scale: float) -> dict:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt, prompt_2=None, device=pipe.text_encoder.device, max_sequence_length=self.max_sequence_length(pipe)
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # guidance is embedded, not CFG

    def training_scheduler(self, pipe):
        """ai-toolkit trains every FLUX.1 (schnell too, whose own scheduler does not shift) with
        FLUX.1-dev's scheduler settings (its toolkit/sampler.py flux_config)."""
        return flux_training_scheduler()

    def loss(self, pipe, denoiser, batch: TrainingBatch, options: LossOptions) -> torch.Tensor:
        from diffusers import FluxPipeline

        latents = batch.latents
        b, c, h, w = latents.shape
        noise = self.noise_like(latents, options)
        index = noise_level_indices(b, options.content_or_style, latents.device)
        table = sigma_table(options, image_seq_len=h * w // 4, device=latents.device)  # 2x2 patches as tokens
        sigmas = table[index]
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
        weights = None if batch.loss_weights is None else packed_weights(batch.loss_weights, latents.shape)
        return flow_loss(prediction, target, weights, options, index)


def flow_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, options: LossOptions, index
) -> torch.Tensor:
    """The flow-matching families' loss: mean squared error per item (face-weighted when ``weights``),
    times the weight of the noise level drawn (``index``) for ``timestep_type: weighted`` (ai-toolkit's
    measured weights; they win over the bell, as there) or ``linear_timesteps`` (the bell), averaged."""
    per_item = weighted_mean(F.mse_loss(prediction.float(), target.float(), reduction="none"), weights)
    if options.timestep_type == "weighted":
        per_item = per_item * measured_weights(prediction.device)[index]
    elif options.linear_timesteps:
        per_item = per_item * bell_weights(prediction.device)[index]
    return per_item.mean()


def flux_training_scheduler():
    """A scheduler of FLUX.1-dev's settings: what ai-toolkit trains FLUX.1 and FLUX.2 with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_TRAINING_SCHEDULER)


def pipeline_scheduler(pipe):
    """A fresh scheduler of the pipeline's own settings (its shift): what the newer families train with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def packed_weights(weights: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Loss weights (B, 1, H, W) in the layout of packed latents (B, H/2 * W/2, 4C): each weight
    lands on the element of its own latent cell."""
    from diffusers import FluxPipeline

    b, c, h, w = shape
    return FluxPipeline._pack_latents(weights.expand(b, c, h, w), b, c, h, w)


def sigma_table(options: LossOptions, image_seq_len: int, device) -> torch.Tensor:
    """``NOISE_LEVELS`` sigmas in (0, 1], most noise first, for one batch.

    "sigmoid" (the default): sorted sigmoid(normal) draws, a logit-normal distribution. "linear" (or
    ``linear_timesteps``, or "weighted", which weights the loss instead): evenly spaced from 1 to
    0.001. "shift": the even levels shifted towards noise as the scheduler does at inference
    (``shifted``).
    """
    kind = "linear" if options.linear_timesteps or options.timestep_type == "weighted" else options.timestep_type
    if kind == "sigmoid":
        return torch.sigmoid(torch.randn(NOISE_LEVELS, device=device)).sort(descending=True).values
    if kind == "linear":
        return torch.linspace(1.0, 1.0 / NOISE_LEVELS, NOISE_LEVELS, device=device)
    # ai-toolkit spaces the shift types' levels over the scheduler's own sigma range: 1 to 0.001, or
    # with a fixed shift (Z-Image) to that shift's 0.001, which the shift below moves again (0.009).
    scheduler = options.scheduler
    even = torch.linspace(scheduler.sigma_max, scheduler.sigma_min, NOISE_LEVELS, device=device)
    return shifted(even, scheduler, image_seq_len)


def shifted(even: torch.Tensor, scheduler, image_seq_len: int) -> torch.Tensor:
    """``even`` sigmas shifted as ``scheduler`` shifts them at inference: by mu, which grows with the
    image's token count, when it shifts dynamically (FLUX.1), else by its fixed ``shift``; then, when
    its config has a ``shift_terminal`` (Qwen-Image: 0.02), stretched by the scheduler's own rule so
    the last level lands on it, as ai-toolkit does for its shift types."""
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        mu = dynamic_shift(image_seq_len, config)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / even - 1))
    else:
        shift = config.get("shift", 3.0)
        sigmas = shift * even / (1 + (shift - 1) * even)
    if config.get("shift_terminal"):
        sigmas = scheduler.stretch_shift_to_terminal(sigmas)
    return sigmas


def dynamic_shift(image_seq_len: int, config) -> float:
    """mu for ``image_seq_len`` tokens: linear from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len (FLUX.1: 0.5 at 256 tokens, 1.15 at 4096, i.e. 1024 px)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


def bell_weights(device) -> torch.Tensor:
    """ai-toolkit's loss weights for ``linear_timesteps``: a bell over the table's indices, peak in
    the middle, about 0 at both ends, mean 1."""
    x = torch.arange(NOISE_LEVELS, dtype=torch.float32, device=device)
    bell = torch.exp(-2 * ((x - NOISE_LEVELS / 2) / NOISE_LEVELS) ** 2)
    bell = bell - bell.min()
    return bell * (NOISE_LEVELS / bell.sum())


def measured_weights(device) -> torch.Tensor:
    """``timestep_type: weighted``'s loss weight per noise level (index 0: the most noise), mean 1:
    the piecewise-linear curve through ``WEIGHTED_KNOTS`` (our fit of ai-toolkit's measured table)."""
    knots = torch.tensor(weighted_knot_indices(), dtype=torch.float64)
    curve = piecewise_linear(knots, torch.tensor(WEIGHTED_KNOTS, dtype=torch.float64))
    return (curve / curve.mean()).to(device=device, dtype=torch.float32)


def weighted_knot_indices() -> list[int]:
    """Where ``WEIGHTED_KNOTS`` sit: every ``WEIGHTED_KNOT_SPACING``-th level, and the last one."""
    return [*range(0, NOISE_LEVELS, WEIGHTED_KNOT_SPACING), NOISE_LEVELS - 1]


def piecewise_linear(knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The curve through (``knots``, ``values``), straight between neighbours, at every level 0..999
    (``knots`` ascending, the first 0 and the last 999)."""
    levels = torch.arange(NOISE_LEVELS, dtype=values.dtype)
    right = torch.searchsorted(knots, levels, right=True).clamp(1, len(knots) - 1)
    left_x, right_x = knots[right - 1], knots[right]
    t = (levels - left_x) / (right_x - left_x)
    return values[right - 1] * (1 - t) + values[right] * t
