"""Captions, trigger words, buckets and the latent cache."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from fastbackend.training import data
from tests.training_helpers import install_model, train, upload_photos, user_yaml


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a man, photo", "Matt", "Matt a man, photo"),
        ("[trigger] smiling, photo", "p3r5on", "p3r5on smiling, photo"),
        ("photo of [name]", "p3r5on", "photo of p3r5on"),
        ("Matt at the beach", "Matt", "Matt at the beach"),
        ("", "Matt", "Matt"),
        ("[trigger] smiling", None, "smiling"),
    ],
)
def test_trigger_word_follows_ai_toolkit(caption, trigger, expected):
    assert data.apply_trigger(caption, trigger) == expected


def example(caption: str, trigger: str | None = None) -> data.Example:
    item = data.Item(Path("x.jpg"), "0" * 64, caption, (64, 64))
    return data.Example(item, data.apply_trigger(caption, trigger), (64, 64))


def test_caption_dropout_and_shuffle_as_ai_toolkit():
    rng = random.Random(0)
    # every part is shuffled, then the trigger goes in front (ai-toolkit's data loader)
    options = data.CaptionOptions(trigger_word="Matt", shuffle=True)
    shuffled = {data.caption_for_step(example("a, b, c, d", "Matt"), options, rng) for _ in range(50)}
    assert len(shuffled) > 1 and all(s.startswith("Matt ") for s in shuffled)
    assert sorted(next(iter(shuffled)).removeprefix("Matt ").split(", ")) == ["a", "b", "c", "d"]
    assert data.caption_for_step(example("Matt, photo"), data.CaptionOptions(dropout_rate=1.0), rng) == ""
    # a dropped caption keeps the process's trigger word, so the subject stays tied to it ...
    dropped = data.CaptionOptions(trigger_word="p3r5on", dropout_trigger="p3r5on", dropout_rate=1.0)
    assert data.caption_for_step(example("smiling, photo", "p3r5on"), dropped, rng) == "p3r5on"
    # ... but not a dataset's own trigger, which ai-toolkit adds before the dropout
    dataset_only = data.CaptionOptions(trigger_word="p3r5on", dropout_rate=1.0)
    assert data.caption_for_step(example("smiling, photo", "p3r5on"), dataset_only, rng) == ""


def test_sample_prompts_only_have_their_tags_replaced():
    assert data.apply_trigger("[trigger] at the beach", "p3r5on", add_if_missing=False) == "p3r5on at the beach"
    assert data.apply_trigger("a dog", "p3r5on", add_if_missing=False) == "a dog"


@pytest.mark.parametrize(
    ("size", "resolution", "multiple", "bucket"),
    [
        ((4032, 3024), 1024, 16, (1152, 832)),  # a 4:3 phone photo at 1024: ~1M pixels, sides in 64s
        ((3024, 4032), 512, 16, (384, 576)),
        ((1000, 1000), 768, 64, (768, 768)),
        ((300, 300), 512, 16, (256, 256)),  # smaller than the resolution: its own size, snapped
        ((640, 480), 64, 4, (72, 52)),  # tiny test resolutions snap to the model's own step
    ],
)
def test_buckets_keep_aspect_and_area(size, resolution, multiple, bucket):
    assert data.bucket_for(*size, resolution, multiple) == bucket


def test_latents_cached_to_disk_are_reused_by_the_next_run(tiny_models, data_root, monkeypatch):
    model_path = install_model(tiny_models, data_root, "sdxl")
    upload_photos()
    yaml_text = user_yaml(model_path, "sdxl", steps=2, resolutions=(64, 96))
    assert train(yaml_text)["status"] == "success"
    cached = list((data_root / "training_data" / "matt_training_test" / ".cache" / "latents").rglob("*.safetensors"))
    assert len(cached) == 6  # 3 images x 2 resolutions

    def no_encoding(*args):
        raise AssertionError("latents should come from the disk cache")

    monkeypatch.setattr(data, "encode_example", no_encoding)
    again = train(yaml_text, resume=False)
    assert again["status"] == "success", again
    assert handler_lists_one_dataset()


def handler_lists_one_dataset() -> bool:
    from handler_fast import handler

    listing = handler({"id": "l", "input": {"type": "list_datasets"}})
    return listing["total_count"] == 1 and listing["datasets"][0]["image_count"] == 3


def test_training_without_any_caching_and_with_shuffled_captions(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    yaml_text = user_yaml(
        model_path,
        "sd15",
        steps=3,
        replacements={
            "cache_latents_to_disk: true": "cache_latents_to_disk: false\n      cache_latents: false",
            "shuffle_tokens: false": "shuffle_tokens: true",
            "dtype: bf16": "dtype: bf16\n      cache_text_embeddings: false",
            "sample_every: 100": "sample_every: 1000",
        },
    )
    answer = train(yaml_text)
    assert answer["status"] == "success", answer
    assert not (data_root / "training_data" / "matt_training_test" / ".cache").exists()


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("adamw", {"weight_decay": 0.01}, "AdamW"),
        ("adamw8bit", {}, "AdamW8bit"),  # bitsandbytes', on the CPU too
        ("sgd", {"momentum": 0.9}, "SGD"),
        ("prodigy", {}, "Prodigy"),
    ],
)
def test_optimizers(name, params, expected):
    import torch

    from fastbackend.config import TrainConfig
    from fastbackend.training.setup import make_optimizer

    warnings: list[str] = []
    config = TrainConfig(optimizer=name, optimizer_params=params, lr=1.0 if name == "prodigy" else 1e-4)
    optimizer = make_optimizer(config, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"), warnings)
    assert type(optimizer).__name__ == expected
    assert warnings == []


def test_adamw8bit_keeps_8bit_state_on_the_cpu_and_learns():
    """bitsandbytes keeps 8-bit moments for tensors of 4096 values and more (ai-toolkit's setting too)."""
    import torch

    from fastbackend.config import TrainConfig
    from fastbackend.training.setup import make_optimizer

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))
    target = torch.randn(64, 128)
    optimizer = make_optimizer(TrainConfig(optimizer="adamw8bit", lr=1e-2), [weight], torch.device("cpu"), [])
    losses = []
    for _ in range(20):
        loss = (weight - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert optimizer.state[weight]["state1"].dtype == torch.uint8
    assert losses[-1] < 0.9 * losses[0]


def test_without_bitsandbytes_adamw8bit_falls_back_with_a_warning(monkeypatch):
    import torch

    from fastbackend.config import TrainConfig
    from fastbackend.training import setup

    monkeypatch.setattr(setup, "bitsandbytes_available", lambda: False)
    warnings: list[str] = []
    optimizer = setup.make_optimizer(
        TrainConfig(optimizer="adamw8bit"), [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"), warnings
    )
    assert type(optimizer).__name__ == "AdamW"
    assert warnings == ["config.process[0].train.optimizer: adamw8bit needs bitsandbytes; using AdamW"]


def test_optimizer_params_that_do_not_fit_are_refused_with_the_config():
    from fastbackend.config import parse_training_config
    from fastbackend.errors import FastBackendError

    yaml_text = user_yaml(
        "/workspace/models/flux",
        replacements={"optimizer: adamw8bit": "optimizer: sgd\n      optimizer_params:\n        betas: [0.9, 0.99]"},
    )
    with pytest.raises(FastBackendError, match=r"config.process\[0\].train.optimizer_params: not valid for sgd"):
        parse_training_config(yaml_text)


def test_v_prediction_min_snr_noise_offset_and_warmup_train(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    yaml_text = user_yaml(
        model_path,
        "sd15",
        steps=3,
        replacements={
            "arch: sd15": "arch: sd15\n      is_v_pred: true",
            "dtype: bf16": "dtype: bf16\n      min_snr_gamma: 5\n      noise_offset: 0.05\n      lr_scheduler: cosine\n"
            "      lr_scheduler_params:\n        num_warmup_steps: 1\n      seed: 7",
            "sample_every: 100": "sample_every: 1000",
        },
    )
    answer = train(yaml_text)
    assert answer["status"] == "success", answer
    assert all(math.isfinite(loss) for _, loss in answer["loss_history"])


def test_a_folder_made_by_hand_is_read_with_captions_and_upright_sizes(tmp_path):
    from tests.photos import photo

    (tmp_path / "turned.jpg").write_bytes(photo(800, 600, orientation=6))  # stored landscape, seen portrait
    (tmp_path / "turned.txt").write_text("Matt, portrait\n")
    (tmp_path / "plain.png").write_bytes(photo(640, 480, "PNG"))
    (tmp_path / ".hidden.jpg").write_bytes(photo(640, 480))
    items = data.read_items(tmp_path, default_caption="a photo")
    assert [(i.path.name, i.caption, i.size) for i in items] == [
        ("plain.png", "a photo", (640, 480)),
        ("turned.jpg", "Matt, portrait", (600, 800)),
    ]
    examples = data.make_examples(items, [256], 16, "Matt", 1.0)
    assert [e.bucket for e in examples] == [(256, 192), (192, 256)]  # the turned photo gets a portrait bucket


def test_without_caching_the_encoders_run_for_every_batch(tiny_models, data_root, monkeypatch):
    from fastbackend.training.families.sd15 import SD15

    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    calls = {"pixels": 0, "prompt": 0}
    encode_pixels, encode_prompt = SD15.encode_pixels, SD15.encode_prompt

    def counted_pixels(self, pipe, pixels):
        calls["pixels"] += pixels.shape[0]
        return encode_pixels(self, pipe, pixels)

    def counted_prompt(self, pipe, text):
        calls["prompt"] += 1
        return encode_prompt(self, pipe, text)

    monkeypatch.setattr(SD15, "encode_pixels", counted_pixels)
    monkeypatch.setattr(SD15, "encode_prompt", counted_prompt)
    yaml_text = user_yaml(
        model_path,
        "sd15",
        steps=3,
        replacements={
            "cache_latents_to_disk: true": "cache_latents_to_disk: false\n      cache_latents: false",
            "gradient_accumulation_steps: 4": "gradient_accumulation: 2",
            "batch_size: 1": "batch_size: 2",
            "dtype: bf16": "dtype: bf16\n      cache_text_embeddings: false",
            "sample_every: 100": "sample_every: 1000",
        },
    ).replace("      train_unet: true\n", "      train_unet: true\n      disable_sampling: true\n")
    assert train(yaml_text)["status"] == "success"
    # 3 steps x 2 batches x 2 images: every image and caption encoded when it is drawn, none up front
    assert calls == {"pixels": 12, "prompt": 12}
