"""Z-Image and Qwen-Image: files keyed as ai-toolkit writes them (and ComfyUI maps them), alpha honoured, guidance."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from fastbackend.config import parse_training_config
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos, user_yaml

# What ComfyUI's Z-Image key map (diffusers names to its NextDiT) and ai-toolkit's loader accept for a
# block's Linear layers: to_q / to_k / to_v (ComfyUI slices them into its fused qkv), to_out.0 (its
# `out`), the feed forward and the modulation.
COMFYUI_BLOCK_KEY = re.compile(
    r"diffusion_model\.layers\.\d+\."
    r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)\.lora_[AB]\.weight"
)


# ComfyUI's Qwen-Image model keeps diffusers' module names: `diffusion_model.<name>` maps directly.
COMFYUI_KEYS = {
    "zimage": (COMFYUI_BLOCK_KEY, "layers.", "ZImageTransformer2DModel"),
    "qwen_image": (
        re.compile(r"diffusion_model\.transformer_blocks\.\d+\.[\w.]+\.lora_[AB]\.weight"),
        "transformer_blocks.",
        "QwenImageTransformer2DModel",
    ),
}


@pytest.mark.parametrize("arch", sorted(COMFYUI_KEYS))
def test_files_are_keyed_as_ai_toolkit_writes_them_and_train_at_scale_one(arch, tiny_models, data_root):
    import diffusers

    model_path = install_model(tiny_models, data_root, arch)
    upload_photos(count=1)
    replacements = {
        "linear: 16": "linear: 4",
        "linear_alpha: 16": "linear_alpha: 8",
        "sample_every: 100": "sample_every: 1000",
    }
    answer = train(user_yaml(model_path, arch, steps=2, replacements=replacements))
    assert answer["status"] == "success", answer
    with safe_open(answer["lora_path"], framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    pattern, blocks, class_name = COMFYUI_KEYS[arch]
    assert all(pattern.fullmatch(key) for key in keys), sorted(keys)[:5]
    transformer = getattr(diffusers, class_name).from_pretrained(data_root / "models" / arch / "transformer")
    linears = {n for n, m in transformer.named_modules() if n.startswith(blocks) and isinstance(m, torch.nn.Linear)}
    assert {key.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for key in keys} == linears
    # ai-toolkit trains these families at scale 1 (alpha = rank) whatever linear_alpha says, and says so here.
    assert metadata["ss_network_alpha"] == "4.0" and not any(key.endswith(".alpha") for key in keys)
    assert (
        f"config.process[0].network.linear_alpha: {arch} LoRAs train at scale 1 (alpha = rank 4), as in "
        "ai-toolkit; 8 is not used"
    ) in answer["warnings"]


def test_lora_b_carries_alpha_over_rank():
    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for

    states = {
        "transformer": {
            "layers.0.attention.to_q.lora_A.weight": torch.ones(4, 8),
            "layers.0.attention.to_q.lora_B.weight": torch.ones(8, 4),
        }
    }
    keyed = lora_io.to_file_format(family_for("zimage"), states, rank=4, alpha=8)
    assert torch.equal(keyed["diffusion_model.layers.0.attention.to_q.lora_B.weight"], torch.full((8, 4), 2.0))
    assert torch.equal(keyed["diffusion_model.layers.0.attention.to_q.lora_A.weight"], torch.ones(4, 8))


def test_the_user_yaml_with_arch_zimage_trains_at_scale_one_with_its_noise_offset():
    text = fixture_yaml().replace("is_flux: true", "arch: zimage").replace("linear_alpha: 16", "linear_alpha: 8")
    text = text.replace("dtype: bf16", "dtype: bf16\n      noise_offset: 0.1")
    config, warnings = parse_training_config(text)
    assert config.process.model.resolved_arch == "zimage" and config.process.lora_alpha == 16
    assert not any("noise_offset" in warning for warning in warnings)  # ai-toolkit offsets every model's noise


@pytest.mark.parametrize(("scale", "pipeline", "guided"), [(1.0, 0.0, False), (4.0, 3.0, True), (0.5, 0.0, False)])
def test_guidance_is_the_usual_scale_and_the_pipeline_gets_it_minus_one(scale, pipeline, guided):
    from fastbackend.training.families import family_for

    family = family_for("zimage")
    assert family.pipeline_guidance(scale) == pipeline and family.guided(scale) is guided


def test_qwen_image_guidance_is_true_cfg_against_an_empty_negative():
    from fastbackend.training.families import family_for

    family = family_for("qwen_image")
    assert family.guidance_arguments(4.0) == {"true_cfg_scale": 4.0} and family.guided(4.0)
    assert not family.guided(1.0) and family.sample_kwargs(None, "") == {"negative_prompt": " "}


# BFL's module names in a FLUX.2 block, as ComfyUI's FLUX.2 model and ai-toolkit name them.
FLUX2_KEY = re.compile(
    r"diffusion_model\.(double_blocks\.\d+\.(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|img_mlp\.[02]|txt_mlp\.[02])"
    r"|single_blocks\.\d+\.linear[12])\.lora_[AB]\.weight"
)


def test_flux2_files_fuse_qkv_at_the_trained_rank_and_load_in_diffusers_to_the_same_output(tiny_models):
    """q, k and v share one lora_A while training, as ai-toolkit's one LoRA on the fused qkv: the file
    holds that LoRA at the trained rank (A once, the three B stacked), which ComfyUI and ai-toolkit load
    on their fused layer; diffusers' loader splits it back, and the transformer's output is the trained one."""
    from diffusers import Flux2KleinPipeline

    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for

    family = family_for("flux2_klein_4b")
    pipe = Flux2KleinPipeline.from_pretrained(tiny_models / "flux2_klein_4b")
    transformer = pipe.transformer
    targets, shared = family.lora_targets(transformer), family.shared_lora_down(transformer)
    params = lora_io.add_lora(transformer, targets, rank=4, alpha=8, dropout=0.0, shared_down=shared)
    attention = transformer.transformer_blocks[0].attn
    assert attention.to_k.lora_A["fastbackend"].weight is attention.to_q.lora_A["fastbackend"].weight
    assert attention.add_v_proj.lora_A["fastbackend"].weight is attention.add_q_proj.lora_A["fastbackend"].weight
    assert sum(p is attention.to_q.lora_A["fastbackend"].weight for p in params) == 1  # trained once
    torch.manual_seed(1)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:  # trained: B no longer zero, A moved
            parameter.data.normal_(0, 0.05)
    states = lora_io.lora_state({"transformer": transformer})
    keyed = lora_io.to_file_format(family, states, rank=4, alpha=8)
    assert all(FLUX2_KEY.fullmatch(key) for key in keyed), sorted(keyed)[:5]
    hidden = attention.to_q.in_features
    assert keyed["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"].shape == (4, hidden)
    assert keyed["diffusion_model.double_blocks.0.txt_attn.qkv.lora_B.weight"].shape == (3 * hidden, 4)

    def output(model):
        torch.manual_seed(0)
        hidden, text = torch.randn(1, 16, 16), torch.randn(1, 8, 48)
        ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 16, 4, 4))
        return model(
            hidden, text, torch.tensor([0.5]), ids, Flux2KleinPipeline._prepare_text_ids(text), return_dict=False
        )[0]

    with torch.no_grad():
        trained = output(transformer)
        fresh = Flux2KleinPipeline.from_pretrained(tiny_models / "flux2_klein_4b")
        base = output(fresh.transformer)
        fresh.load_lora_weights({key: value.clone() for key, value in keyed.items()})
        loaded = output(fresh.transformer)
    assert not torch.allclose(trained, base, atol=1e-4)
    assert torch.allclose(trained, loaded, atol=1e-5)


@pytest.mark.parametrize("arch", ["zimage", "qwen_image", "flux2_klein_4b", "flux2"])
def test_the_training_target_is_what_the_pipelines_sampler_integrates(arch, tiny_models):
    """A perfect denoiser that knows the clean latents x0 and answers with the trainer's target for what
    it is fed: the trainer's loss is 0, and the pipeline's own sampler, run with it, hands the VAE exactly
    the raw latents. A wrong sign, timestep, latent scaling or packing breaks one or the other."""
    from diffusers import DiffusionPipeline

    from fastbackend.training.families import LossOptions, TrainingBatch, family_for

    family = family_for(arch)
    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    pipe.set_progress_bar_config(disable=True)
    if arch.startswith("flux2"):  # batch-norm statistics other than 0 and 1
        pipe.vae.bn.running_mean.copy_(torch.randn_like(pipe.vae.bn.running_mean))
        pipe.vae.bn.running_var.copy_(torch.rand_like(pipe.vae.bn.running_var) * 3 + 0.2)
    torch.manual_seed(0)
    side = 64 // pipe.vae_scale_factor
    raw = torch.randn(1, 4, side, side)  # the tiny VAE's latents of a 64 px image
    x0 = family.scale_latents(pipe, raw)
    denoiser = family.denoiser(pipe)
    denoiser.forward = perfect_denoiser(arch, x0)
    cond = family.encode_prompt(pipe, "a photo")
    batch = TrainingBatch(latents=x0, cond=cond, sizes=torch.tensor([[64, 64, 0, 0, 64, 64]]))
    options = LossOptions(scheduler=family.training_scheduler(pipe))
    assert max(family.loss(pipe, denoiser, batch, options).item() for _ in range(5)) < 1e-8
    decoded = {}
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *args, **kwargs: (
        decoded.setdefault("z", z.clone()) is not None and decode(z, *args, **kwargs)
    )
    pipe(prompt="a photo", num_inference_steps=3, height=64, width=64, **family.guidance_arguments(1.0))
    z = decoded["z"][:, :, 0] if decoded["z"].dim() == 5 else decoded["z"]
    assert torch.allclose(z, raw, atol=1e-4), (z - raw).abs().max()


def perfect_denoiser(arch: str, x0: torch.Tensor):
    """A transformer's forward that answers with the trainer's target for the clean latents ``x0``."""
    if arch == "zimage":  # fed a list of (C, 1, H, W) images and 1 - sigma; answers latents - noise

        def zimage(images, t, captions, **kwargs):
            answers = []
            for image, fed in zip(images, t, strict=True):
                sigma, clean = 1 - fed, x0[0].unsqueeze(1)
                noise = (image - (1 - sigma) * clean) / sigma
                answers.append(clean - noise)
            return (answers,)

        return zimage
    if arch == "qwen_image":
        from diffusers import QwenImagePipeline

        packed = QwenImagePipeline._pack_latents(x0, *x0.shape)
    else:
        from diffusers import Flux2KleinPipeline

        packed = Flux2KleinPipeline._pack_latents(x0)

    def velocity(hidden_states=None, timestep=None, **kwargs):  # fed sigma; answers noise - latents
        sigma = timestep.view(-1, 1, 1)
        noise = (hidden_states - (1 - sigma) * packed) / sigma
        return (noise - packed,)

    return velocity


@pytest.mark.parametrize("arch", ["zimage", "qwen_image"])
def test_captions_of_different_lengths_batch_as_each_would_alone(arch, tiny_models, monkeypatch):
    """Z-Image and Qwen-Image cache each caption at its own length, and a batch pads them with zeros
    and a mask: the padding must be invisible, each item's loss in the batch the loss it has alone."""
    import importlib

    from diffusers import DiffusionPipeline

    from fastbackend.training import data
    from fastbackend.training.families import LossOptions, TrainingBatch, family_for

    family = family_for(arch)
    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    short = family.encode_prompt(pipe, "a photo")
    long = family.encode_prompt(pipe, "a photo of a man in a green hat standing in a garden at noon, smiling")
    assert short["prompt_embeds"].shape[1] < long["prompt_embeds"].shape[1]
    # Noise and noise levels that do not depend on the batch: the same for an item in or out of it.
    monkeypatch.setattr(torch, "randn_like", lambda x: torch.sin(7 * x + 1))
    module = importlib.import_module(type(family).__module__)
    monkeypatch.setattr(module, "noise_level_indices", lambda b, style, device: torch.full((b,), 400))
    torch.manual_seed(0)
    latents = family.scale_latents(pipe, torch.randn(2, 4, 8, 8))
    options = LossOptions(scheduler=family.training_scheduler(pipe), timestep_type="linear")

    def loss(items: list[int], conds: list[dict]) -> torch.Tensor:
        cond = {key: data.pad_cat([c[key] for c in conds]) for key in conds[0]}
        sizes = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(items))
        with torch.no_grad():
            return family.loss(pipe, family.denoiser(pipe), TrainingBatch(latents[items], cond, sizes), options)

    together = loss([0, 1], [short, long])
    alone = (loss([0], [short]) + loss([1], [long])) / 2
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-7), (together, alone)


def test_a_distilled_klein_trains_with_a_warning_that_names_the_base_checkpoint(tiny_models, data_root):
    import json

    from tests.training_helpers import install_model, train, upload_photos, user_yaml

    model_path = install_model(tiny_models, data_root, "flux2_klein_4b")
    index = data_root / "models" / "flux2_klein_4b" / "model_index.json"
    upload_photos()
    answer = train(user_yaml(model_path, "flux2_klein_4b", steps=1))
    assert answer["status"] == "success", answer
    assert not any("step-distilled" in w for w in answer["warnings"])
    index.write_text(json.dumps(json.loads(index.read_text()) | {"is_distilled": True}))
    answer = train(user_yaml(model_path, "flux2_klein_4b", steps=1).replace("name: nowy", "name: other"))
    assert answer["status"] == "success", answer
    assert (
        f"config.process[0].model.name_or_path: {model_path} is a step-distilled FLUX.2 [klein]; a LoRA trained "
        "on it works against its distillation, so ai-toolkit trains the base checkpoints "
        "(black-forest-labs/FLUX.2-klein-base-4B)"
    ) in answer["warnings"]


def test_a_saved_state_of_another_lora_layout_starts_over_instead_of_loading_into_the_wrong_layers(
    tiny_models, data_root, monkeypatch
):
    """FLUX.2's q, k and v share one lora_A; a state saved with three (this worker's earlier layout)
    names the same tensors but not the same parameters: the fingerprint counts them, so it is not
    loaded into the shared one (which would keep v's and pair it with q's and k's B)."""
    from fastbackend.training.families import Family
    from fastbackend.training.families.flux2 import Flux2Klein
    from tests.training_helpers import install_model, killed_at_step, train, upload_photos, user_yaml

    model_path = install_model(tiny_models, data_root, "flux2_klein_4b")
    upload_photos()
    saves = {"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"}
    text = user_yaml(model_path, "flux2_klein_4b", steps=4, replacements=saves)
    with killed_at_step(3, monkeypatch), monkeypatch.context() as patched:
        patched.setattr(Flux2Klein, "shared_lora_down", lambda self, denoiser: [])  # three lora_A, untied
        patched.setattr(Flux2Klein, "file_tensors", Family.file_tensors)  # (the fused file needs them tied)
        assert train(text)["error_code"] == "internal_error"
    answer = train(text)
    assert answer["status"] == "success", answer
    assert answer["resumed_from_step"] == 0
    assert any(w.startswith("saved state at step 2 was made with another model") for w in answer["warnings"])
