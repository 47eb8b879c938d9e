"""Each key of the README's config table changes what training does: shown on the run it sets up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastbackend.config import parse_training_config
from fastbackend.layout import LoraFolder
from tests.training_helpers import install_model, train, upload_photos, user_yaml


def set_up_run(tiny_models, data_root, arch: str, replacements: dict[str, str]):
    """The live run the trainer would start from, for the user's YAML with ``replacements``."""
    from fastbackend.api.train import resolve_datasets
    from fastbackend.storage import resolve_base_model
    from fastbackend.training.run import TrainJob
    from fastbackend.training.setup import set_up

    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    config, warnings = parse_training_config(user_yaml(model_path, arch, replacements=replacements))
    base = resolve_base_model(config.process.model.name_or_path, "name_or_path")
    output = LoraFolder(data_root / "output" / config.name)
    return set_up(TrainJob(config, base, resolve_datasets(config), output, warnings=warnings))


SD_KEYS = {
    "arch: sd15": "arch: sd15\n      is_v_pred: true",
    "linear: 16": "linear: 8\n      dropout: 0.25",
    "gradient_checkpointing: true": "gradient_checkpointing: true\n      unet_lr: 0.0003\n"
    "      text_encoder_lr: 0.00002",  # ignored, as ai-toolkit ignores them: every module trains at lr
    "train_text_encoder: false": "train_text_encoder: true",
    "optimizer: adamw8bit": "optimizer: adamw\n      optimizer_params:\n        weight_decay: 0.05\n"
    "        betas: [0.8, 0.9]",
    "lr: 0.0001": "lr: 0.0001\n      lr_scheduler: cosine\n      lr_scheduler_params:\n        num_warmup_steps: 3\n"
    "      noise_offset: 0.07\n"
    "      min_snr_gamma: 5\n      content_or_style: style\n      max_grad_norm: 0.5",
    "ema_decay: 0.99": "ema_decay: 0.95",
    "batch_size: 1": "batch_size: 2",
    "caption_ext: txt": "caption_ext: txt\n      num_repeats: 3",
}


def test_set_up_honours_the_network_train_and_model_keys(tiny_models, data_root):
    run = set_up_run(tiny_models, data_root, "sd15", SD_KEYS)
    assert run.loss_options.scheduler.config.prediction_type == "v_prediction"  # is_v_pred
    lora_a = [m for n, m in run.denoiser.named_modules() if n.endswith("lora_A.fastbackend")]
    assert lora_a and all(m.weight.shape[0] == 8 for m in lora_a)  # linear (rank)
    dropouts = [m for n, m in run.denoiser.named_modules() if n.endswith("lora_dropout.fastbackend")]
    assert dropouts and all(m.p == 0.25 for m in dropouts)  # dropout
    assert run.denoiser.is_gradient_checkpointing  # gradient_checkpointing
    groups = run.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [0.0001, 0.0001]  # lr for both modules; unet_lr etc. ignored
    assert "config.process[0].train.unet_lr: ignored (ai-toolkit trains every LoRA layer at train.lr)" in (
        run.job.warnings
    )
    assert sorted(run.lora_modules) == ["text_encoder", "unet"]  # train_text_encoder
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["betas"] == (0.8, 0.9)  # optimizer_params
    assert type(run.lr_scheduler).__name__ == "LambdaLR" and groups[0]["lr"] == 0.0  # cosine, warming up from 0
    options = run.loss_options
    assert (options.noise_offset, options.min_snr_gamma, options.content_or_style) == (0.07, 5.0, "style")
    assert run.ema.decay == 0.95  # ema_config
    assert run.sampler.batch_size == 2 and len(run.sampler.next_batch()) == 2  # batch_size
    assert set(run.sampler.weights) == {3}  # num_repeats
    assert run.process.train.max_grad_norm == 0.5


def test_max_grad_norm_clips_the_update(tiny_models, data_root, monkeypatch):
    from fastbackend.training import trainer

    run = set_up_run(tiny_models, data_root, "sd15", {"gradient_accumulation_steps: 4": "max_grad_norm: 0.25"})
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm))
    trainer.train_step(run)
    assert clipped == [0.25]  # one group (the UNet): clipped per group, as ai-toolkit


def test_device_and_dtype_fall_back_on_the_cpu_and_the_8bit_paths_do_not(tiny_models, data_root):
    import bitsandbytes as bnb

    run = set_up_run(tiny_models, data_root, "flux", {"device: cuda:0": "device: cuda:3"})
    assert run.denoiser.device.type == "cpu" and run.weight_dtype == torch.float32
    assert run.job.warnings[-3:] == [
        "config.process[0].device: 'cuda:3' is not available here; training on the CPU",
        "config.process[0].train.dtype: bf16 needs CUDA; training in fp32 on the CPU",
        "config.process[0].model.quantize: the denoiser's base weights are bitsandbytes 8-bit (LLM.int8); "
        "ai-toolkit quantizes to qfloat8 (optimum-quanto), so the numerics differ slightly",
    ]
    assert isinstance(run.optimizer.optimizer, bnb.optim.AdamW8bit)  # the user's adamw8bit, really
    bases = [module.base_layer for module in run.denoiser.modules() if hasattr(module, "lora_A")]
    assert bases and all(isinstance(base, bnb.nn.Linear8bitLt) for base in bases)  # every LoRA sits on 8 bits
    assert all(base.weight.dtype == torch.int8 for base in bases)  # quantized, not merely wrapped


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("timestep_type: flux_shift", "shift"),
        ("linear_timesteps: true", "sigmoid"),
        ("timestep_type: weighted", "weighted"),
    ],
)
def test_flow_matching_keys_reach_the_loss(key, expected, tiny_models, data_root):
    run = set_up_run(tiny_models, data_root, "flux", {"gradient_accumulation_steps: 4": key})
    assert run.loss_options.timestep_type == expected
    assert run.loss_options.linear_timesteps == key.startswith("linear_timesteps")


@pytest.mark.parametrize("flag", ["is_xl", "is_ssd", "is_vega"])
def test_sdxl_flags_pick_sdxl(flag):
    config, _ = parse_training_config(user_yaml("/workspace/models/x").replace("is_flux: true", f"{flag}: true"))
    assert config.process.model.resolved_arch == "sdxl"


def test_scheduler_num_cycles_and_num_warmup_steps():
    from tests.test_ai_toolkit_parity import lr_curve

    restarts = lr_curve("cosine_with_restarts", steps=8, lr_scheduler_params={"num_cycles": 2})
    assert restarts[4] == pytest.approx(1.0) and restarts[2] == pytest.approx(0.5)  # two cycles over 8 steps
    assert lr_curve("constant_with_warmup", steps=6, lr_scheduler_params={"num_warmup_steps": 4})[:5] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
    ]


def test_samples_follow_the_sample_keys(tiny_models, data_root, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from fastbackend.training.families.sd15 import SD15

    calls, encoded = [], []

    def record(self, **kwargs):
        calls.append({**kwargs, "seed": kwargs["generator"].initial_seed()})
        return type("Output", (), {"images": [Image.new("RGB", (kwargs["width"], kwargs["height"]))]})()

    real_encode = SD15.encode_for_sampling

    def encode(self, pipe, prompt, negative_prompt, guidance_scale):  # the prompts are encoded before training
        encoded.append((prompt, negative_prompt, guidance_scale))
        return real_encode(self, pipe, prompt, negative_prompt, guidance_scale)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", record)
    monkeypatch.setattr(SD15, "encode_for_sampling", encode)
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    text = user_yaml(
        model_path,
        "sd15",
        steps=2,
        replacements={
            "sample_every: 100": "sample_every: 1\n      format: png",
            "width: 64": "width: 96",
            "neg: ''": "neg: 'blurry'",
            "guidance_scale: 4": "guidance_scale: 6.5",
            "sample_steps: 2": "sample_steps: 3",
        },
    )
    answer = train(text)
    assert answer["status"] == "success", answer
    assert [Path(p).name for p in answer["samples"]][:3] == ["000000001_0.png", "000000001_1.png", "000000001_2.png"]
    first = calls[0]
    assert (first["width"], first["height"], first["num_inference_steps"], first["guidance_scale"]) == (96, 64, 3, 6.5)
    assert encoded[0] == ("Matt, photo", "blurry", 6.5)
    assert {"prompt_embeds", "negative_prompt_embeds"} <= first.keys() and "prompt" not in first
    assert [c["seed"] for c in calls[:3]] == [42, 43, 44]  # walk_seed: the seed walks with the prompt
    no_walk = train(text.replace("walk_seed: true", "walk_seed: false"), resume=False)
    assert no_walk["status"] == "success" and {c["seed"] for c in calls[6:]} == {42}


def test_disable_sampling_and_train_unet(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    text = user_yaml(model_path, steps=2, replacements={"sample_every: 100": "sample_every: 1"})
    answer = train(text.replace("      train_unet: true\n", "      train_unet: true\n      disable_sampling: true\n"))
    assert answer["status"] == "success" and answer["samples"] == []
    refused = train(text.replace("train_unet: true", "train_unet: false"))
    assert refused["error"] == (
        "config.process[0]: train.train_unet is false: training only text encoders is not supported"
    )


def test_default_caption_fills_in_for_images_without_one(tiny_models, data_root):
    from fastbackend.training import data

    upload_photos(count=1)
    folder = data_root / "training_data" / "matt_training_test"
    (folder / "manifest.json").unlink()  # a folder made by hand: images, no captions
    for caption in folder.glob("*.txt"):
        caption.unlink()
    assert [item.caption for item in data.read_items(folder, "a photo of Matt")] == ["a photo of Matt"]


def test_swapping_in_8bit_layers_draws_nothing_from_the_runs_random_numbers():
    """The same seed gives the same LoRA initialisation with quantize on or off."""
    from fastbackend.training.setup import quantize_8bit

    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    torch.manual_seed(0)
    quantize_8bit(module, ["0", "1"])
    after_swap = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_swap, torch.rand(3))


def test_a_cuda_index_this_machine_lacks_falls_back_to_the_cpu(monkeypatch):
    from fastbackend.training.setup import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    warnings: list[str] = []
    device, _ = choose_device("cuda:3", "fp32", warnings)
    assert device.type == "cpu"
    assert warnings == ["config.process[0].device: 'cuda:3' is not available here; training on the CPU"]


def test_8bit_layers_keep_nothing_checkpointing_should_drop_and_give_bitsandbytes_gradients():
    """bitsandbytes' own 8-bit layer keeps its input for the backward pass, out of checkpointing's reach."""
    import gc
    import weakref

    import bitsandbytes as bnb
    from torch.utils.checkpoint import checkpoint

    from fastbackend.training.setup import quantize_8bit

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(256, 256))
    theirs = bnb.nn.Linear8bitLt(256, 256, has_fp16_weights=False, threshold=6.0)
    theirs.weight = bnb.nn.Int8Params(ours[0].weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    theirs.bias = torch.nn.Parameter(ours[0].bias.data.clone(), requires_grad=False)
    quantize_8bit(ours, ["0"])
    ours, theirs = ours.to("cpu"), theirs.to("cpu")
    grads, kept = [], []
    for layer in (ours, theirs):
        intermediates = []

        def block(x, layer=layer, intermediates=intermediates):
            hidden = x * 2
            intermediates.append(weakref.ref(hidden))
            return layer(hidden)

        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = checkpoint(block, x, use_reentrant=False)
        gc.collect()
        kept.append(intermediates[0]() is not None)
        out.square().sum().backward()
        grads.append(x.grad)
    assert kept == [False, True]  # ours lets checkpointing drop the block's inside; bitsandbytes' does not
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
