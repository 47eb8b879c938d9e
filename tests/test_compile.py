"""``train.compile`` (and ai-toolkit's ``model.compile``): the denoiser's repeated blocks compiled
with torch.compile (inductor, on the CPU here), training the same LoRA as without."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tests.training_helpers import install_model, train, upload_photos, user_yaml

SEEDED = {"      lr: 0.0001\n": "      lr: 0.0001\n      seed: 7\n"}


@pytest.mark.slow
def test_compiled_blocks_train_the_same_lora(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    plain_yaml = user_yaml(model_path, steps=2, replacements=SEEDED | {"quantize: true": "quantize: false"})
    plain = train(plain_yaml)
    assert plain["status"] == "success", plain
    counters.clear()
    compiled = train(
        plain_yaml.replace("seed: 7\n", "seed: 7\n      compile: true\n").replace("name: nowy", "name: c_nowy")
    )
    assert compiled["status"] == "success", compiled
    assert "config.process[0].train.compile: 2 blocks compiled with torch.compile" in compiled["warnings"]
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo really compiled (both block kinds; backward too)
    compiled_losses = [loss for _, loss in compiled["loss_history"]]
    assert compiled_losses == pytest.approx([loss for _, loss in plain["loss_history"]], rel=1e-3)
    plain_lora, compiled_lora = load_file(plain["lora_path"]), load_file(compiled["lora_path"])
    assert plain_lora.keys() == compiled_lora.keys()
    for key, value in plain_lora.items():
        assert (compiled_lora[key].float() - value.float()).abs().max() < 1e-3, key


def test_without_a_c_compiler_a_gpu_run_is_not_compiled_and_says_so(monkeypatch):
    from types import SimpleNamespace

    import torch

    from fastbackend.training import setup
    from fastbackend.training.families import family_for

    block = torch.nn.Linear(2, 2)
    denoiser = SimpleNamespace(device=torch.device("cuda", 0), modules=lambda: [block])
    monkeypatch.setattr(setup.shutil, "which", lambda name: None)
    warnings: list[str] = []
    setup.compile_blocks(denoiser, family_for("flux"), False, warnings, "config.process[0].train.compile")
    assert warnings == [
        "config.process[0].train.compile: torch.compile needs a C compiler for its GPU kernels and none is here; "
        "not compiled"
    ]
    assert block._compiled_call_impl is None
