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
TINY_QWEN_HIDDEN = 32
TINY_ZIMAGE_TRANSFORMER = {
    "in_channels": 4,  # the tiny VAE's latent channels
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": TINY_QWEN_HIDDEN,
    "axes_dims": [4, 6, 6],  # sums to the head dim (32 / 2)
}
TINY_QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 16,  # 2x2 patches of the tiny VAE's 4 latent channels
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_QWEN_HIDDEN,
    "axes_dims_rope": (4, 6, 6),
}
# Qwen/Qwen-Image's scheduler_config.json.
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
TINY_KLEIN_TEXT_HIDDEN = 16
TINY_FLUX2_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 16,  # the tiny VAE's 4 latent channels in 2x2 patches
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 3 * TINY_KLEIN_TEXT_HIDDEN,  # three hidden layers side by side
    "timestep_guidance_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),  # sums to the head dim
    "guidance_embeds": False,
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


def qwen_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer over the 256 byte symbols, no merges, with the chat
    markers and a plain chat template (Z-Image and FLUX.2 [klein] put each prompt in one user turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {symbol: index for index, symbol in enumerate(_bytes_to_unicode())}
    vocab |= {token: len(vocab) + index for index, token in enumerate(specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=template,
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    assert len(tokenizer) == len(vocab), f"Qwen tokenizer came out with {len(tokenizer)} entries"
    return tokenizer


def qwen3_text_encoder(layers: int = 2, seed: int = 0):
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(qwen_tokenizer()),
        hidden_size=TINY_QWEN_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
    )
    return Qwen3Model(config)


def build_zimage(folder: Path) -> Path:
    """Z-Image shaped: a single-stream transformer over 2x2 latent patches and Qwen3 caption features."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**TINY_ZIMAGE_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler,
        vae=vae(flux=True),
        text_encoder=qwen3_text_encoder(),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def build_qwen_image(folder: Path) -> Path:
    """Qwen-Image shaped: a dual-stream transformer over 2x2 latent patches, Qwen2.5-VL's last hidden
    states as captions, and its video-style VAE (one frame), with the published scheduler settings."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": TINY_QWEN_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to half the head dim
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    vae_model = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, False, False],  # three downsamples: 8x, as the real one
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    transformer = QwenImageTransformer2DModel(**TINY_QWEN_IMAGE_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(folder)
    return folder


def build_flux2_klein(folder: Path) -> Path:
    """FLUX.2 [klein] shaped: double- and single-stream blocks over the VAE's 2x2-patchified latents, and
    Qwen3's hidden states of layers 9, 18 and 27 side by side (so the tiny Qwen3 has 28 layers)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TINY_KLEIN_TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    )
    vae_model = AutoencoderKLFlux2(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32
    )
    transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,  # the base checkpoints LoRAs are trained on
    )
    pipe.save_pretrained(folder)
    return folder


def build_flux2_dev(folder: Path) -> Path:
    """FLUX.2 [dev] shaped: klein's transformer with a guidance embedding, and Mistral Small 3.1's hidden
    states of layers 10, 20 and 30 (the tiny Mistral has 31). The real pipeline's tokenizer is a Pixtral
    processor (it needs torchvision); a plain tokenizer with a chat template encodes text the same way."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = (  # message content as the pipeline sends it: a list of text parts
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
        "{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    )
    text = {
        "model_type": "mistral",
        "vocab_size": len(tokenizer),
        "hidden_size": TINY_KLEIN_TEXT_HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": 31,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 1024,
    }
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "head_dim": 8, "image_size": 64, "patch_size": 16}
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))
    vae_model = AutoencoderKLFlux2(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32
    )
    transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER | {"guidance_embeds": True})
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2Pipeline(
        scheduler=scheduler, vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "flux": build_flux,
    "flux_schnell": lambda folder: build_flux(folder, guidance_embeds=False),
    "zimage": build_zimage,
    "qwen_image": build_qwen_image,
    "flux2_klein_4b": build_flux2_klein,
    "flux2": build_flux2_dev,
}


def build(arch: str, folder: Path) -> Path:
    """Build the tiny ``arch`` pipeline into ``folder`` (once; an existing one is reused)."""
    if not (folder / "model_index.json").exists():
        BUILDERS[arch](folder)
    return folder


# ---------------------------------------------------------------- a tiny Florence-2 captioner


def bart_tokenizer():
    """Florence-2's tokenizer shape (BART byte-level BPE) over the 256 byte symbols, no merges, plus
    BART's specials and the ``<image>`` token the processor expands."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BartTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab |= {symbol: len(specials) + index for index, symbol in enumerate(_bytes_to_unicode())}
    vocab["<mask>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = BartTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens={"image_token": "<image>"},
    )
    assert len(tokenizer) == len(vocab) + 1, f"BART tokenizer came out with {len(tokenizer)} entries"
    return tokenizer


# What the tiny captioner says of every photo: a detailed caption as Florence-2 writes them, so the
# tests see real generated text go through the rewriting (``fastbackend.captions.personalize``).
TINY_CAPTION = (
    "The image shows a man with short brown hair and a beard, wearing a blue shirt, standing in front of a brick wall."
)


def _teach(model, processor, caption: str) -> None:
    """Train the random model until it writes ``caption`` (about 200 Adam steps, a few seconds)."""
    import torch
    from PIL import Image

    inputs = processor(
        text=["<DETAILED_CAPTION>"], images=[Image.new("RGB", (64, 64), (90, 60, 40))], return_tensors="pt"
    )
    labels = processor.tokenizer([caption], return_tensors="pt").input_ids
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=120, num_beams=3, do_sample=False)
    said = processor.batch_decode(out, skip_special_tokens=True)[0]
    assert said == caption, f"the tiny captioner learned to say {said!r}"


def build_captioner(folder: Path) -> Path:
    """A 120k-parameter random-weight Florence-2 (DaViT vision tower, BART text model) and its processor,
    saved as the hub's ``florence-community`` checkpoints are: loaded by path with the real classes."""
    import torch
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    if (folder / "config.json").exists():
        return folder
    tokenizer = bart_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5, crop_size=None
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    vision = {
        "depths": [1, 1, 1, 1],
        "embed_dim": [8, 16, 32, 32],
        "num_heads": [1, 1, 2, 2],
        "num_groups": [1, 1, 2, 2],
        "window_size": 2,
        "projection_dim": 32,
    }
    text = {
        "vocab_size": len(tokenizer),
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 128,
    }
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    _teach(model, processor, TINY_CAPTION)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
