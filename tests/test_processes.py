"""Every GPU of a worker: two training processes over gloo on the CPU stand in for two GPUs."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.training_helpers import install_model, train, upload_photos, user_yaml

LEARNS = {
    "lr: 0.0001": "lr: 0.003",
    "caption_dropout_rate: 0.05": "caption_dropout_rate: 0.0",
    "gradient_accumulation_steps: 4": "gradient_accumulation_steps: 1",
    "dtype: bf16": "dtype: bf16\n      seed: 1",
}


@pytest.mark.slow
def test_two_processes_train_one_lora_shaped_as_one_process_would(tiny_models, data_root, monkeypatch):
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos(count=2)
    text = user_yaml(model_path, "sd15", steps=16, replacements=LEARNS)
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "1")
    single = train(text.replace("name: nowy", "name: single_nowy"))
    assert single["status"] == "success", single
    assert single["processes"] == 1
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "2")
    double = train(text)
    assert double["status"] == "success", double
    assert double["processes"] == 2
    one, two = load_file(single["lora_path"]), load_file(double["lora_path"])
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}
    losses = [loss for _, loss in double["loss_history"]]
    assert sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.slow
def test_a_stop_reaches_every_process_and_the_run_resumes(tiny_models, data_root, monkeypatch):
    from fastbackend import stopping
    from fastbackend.api.train import train_with_yaml
    from fastbackend.errors import FastBackendError
    from fastbackend.schemas import TrainWithYamlRequest

    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos(count=2)
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "2")
    steps: list[int] = []
    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config=user_yaml(model_path, "sd15", steps=40))
    monkeypatch.setattr(stopping, "requested", lambda: len(steps) >= 3)
    with pytest.raises(FastBackendError) as stopped:
        train_with_yaml(request, progress=lambda info: info["stage"] == "training" and steps.append(info["step"]))
    assert stopped.value.code == "stopped", stopped.value
    step = int(stopped.value.message.split(" at step ")[1].split(":")[0])
    assert 3 <= step < 40
    assert (data_root / "output" / "nowy_dataset_1.3" / f"nowy_dataset_1.3_{step:09d}.safetensors").exists()
    monkeypatch.setattr(stopping, "requested", lambda: False)
    again = train_with_yaml(request)
    assert again["resumed_from_step"] == step and again["steps"] == 40 and again["processes"] == 2
