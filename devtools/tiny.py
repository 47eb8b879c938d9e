"""Tiny random-weight diffusers pipelines (FLUX.1, SDXL, SD 1.5), built offline and saved to a folder.

They are loaded by path exactly as a real model is, so the whole training path runs on a CPU
with no hub: the tests, the README's demo and the benchmarks use them. They prove the pipeline,
not image quality. Tokenizers are built from in-memory vocabularies (transformers 5 ignores
the old ``vocab_file=`` arguments and silently yields a 3-entry tokenizer, hence the checks).
"""

from __future__ import annotations

from pathlib import Path

TINY_CLIP_HIDDEN = 32
TINY_T5_DIM = 32
TINY_FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 4 * 4,  # 2x2 patches of the 4 latent channels
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_T5_DIM,
    "pooled_projection_dim": TINY_CLIP_HIDDEN,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
}
# What the SD 1.5 and SDXL UNets share: two levels, one layer each, 4 latent channels.
TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
}


def clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: 256 byte symbols, their word-end forms, 2 specials."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab |= {f"{symbol}</w>": len(symbols) + index for index, symbol in enumerate(symbols)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")
    assert len(tokenizer) == 514, f"CLIP tokenizer came out with {len(tokenizer)} entries"
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in for each byte value (the GPT-2 byte-level mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(extra))]


def t5_tokenizer():
    """A unigram T5 tokenizer over letters, digits and punctuation; ids 0/1/2 are pad, eos, unk."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in letters + "0123456789,.!?-'()[]"]
    pieces += [(f"▁{c}", -1.5) for c in letters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    assert len(tokenizer) == len(pieces), f"T5 tokenizer came out with {len(tokenizer)} entries"
    return tokenizer


def clip_text_encoder(with_projection: bool = False, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=TINY_CLIP_HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        projection_dim=TINY_CLIP_HIDDEN,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def vae(flux: bool = False):
    from diffusers import AutoencoderKL

    options = (
        {"shift_factor": 0.0609, "scaling_factor": 1.5035, "use_quant_conv": False, "use_post_quant_conv": False}
        if flux
        else {}
    )
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        **options,
    )


def build_sd15(folder: Path) -> Path:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CLIP_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    return save_sd15(folder, unet, vae(), clip_text_encoder(), scheduler)


def save_sd15(folder: Path, unet, vae_model, text_encoder, scheduler) -> Path:
    """An SD 1.5 pipeline of these parts, with the byte-level tokenizer and no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path) -> Path:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 1),
        # Six size/crop numbers, each embedded, plus the pooled text embedding.
        projection_class_embeddings_input_dim=6 * time_embed_dim + TINY_CLIP_HIDDEN,
        cross_attention_dim=2 * TINY_CLIP_HIDDEN,  # both encoders' hidden states side by side
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=clip_text_encoder(seed=0),
        text_encoder_2=clip_text_encoder(True, seed=1),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder


def build_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1-dev shaped (guidance embedding) or, with ``guidance_embeds=False``, schnell shaped."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER | {"guidance_embeds": guidance_embeds})
    t5 = T5EncoderModel(
        T5Config(
            d_model=TINY_T5_DIM,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            vocab_size=160,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    from fastbackend.training.families.flux import FLUX_TRAINING_SCHEDULER

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_TRAINING_SCHEDULER)  # FLUX.1-dev's own settings
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae(flux=True),
        text_encoder=clip_text_encoder(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "flux": build_flux,
    "flux_schnell": lambda folder: build_flux(folder, guidance_embeds=False),
}


def build(arch: str, folder: Path) -> Path:
    """Build the tiny ``arch`` pipeline into ``folder`` (once; an existing one is reused)."""
    if not (folder / "model_index.json").exists():
        BUILDERS[arch](folder)
    return folder
