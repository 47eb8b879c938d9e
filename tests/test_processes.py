"""Every GPU of a worker: two training processes over gloo on the CPU stand in for two GPUs."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.training_helpers import install_model, train, upload_photos, user_yaml

LEARNS = {
    "lr: 0.0001": "lr: 0.003",
    "caption_dropout_rate: 0.05": "caption_dropout_rate: 0.0",
    "gradient_accumulation_steps: 4": "gradient_accumulation_steps: 1",
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
    # The same seed, but the second process draws its own batches and noise: another run.
    assert double["loss_history"] != single["loss_history"]


@pytest.mark.slow
def test_processes_share_one_seed_when_the_config_sets_none(tiny_models, data_root, monkeypatch):
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos(count=2)
    text = user_yaml(model_path, "sd15", steps=2, replacements=LEARNS).replace("      seed: 1234\n", "")
    assert "seed: 1234" not in text  # the user's YAML sets no training seed
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "2")
    answer = train(text)
    assert answer["status"] == "success", answer  # else the LoRAs diverge from their first step
    assert any(
        w.startswith("config.process[0].train.seed: none set; 2 processes share the seed ") for w in answer["warnings"]
    )


def test_a_failure_in_a_process_is_answered_as_the_worker_answers_it():
    import errno

    import torch

    from fastbackend.training.distributed import as_answer

    full = as_answer(OSError(errno.ENOSPC, "No space left on device", "/runpod-volume/output/x/state.pt"), 1)
    assert full.code == "disk_full" and "/runpod-volume" not in full.message
    assert as_answer(torch.cuda.OutOfMemoryError("CUDA out of memory"), 0).code == "out_of_memory"
    odd = as_answer(RuntimeError("secret path /root/.cache/token"), 1)
    assert (
        odd.code == "internal_error"
        and odd.message == "internal error (RuntimeError) in training process 1; see the worker log"
    )


def test_a_result_that_never_arrives_ends_the_wait():
    import queue
    from types import SimpleNamespace

    from fastbackend.errors import FastBackendError
    from fastbackend.training.distributed import relay
    from fastbackend.training.run import Hooks

    ended = [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=0)]
    with pytest.raises(FastBackendError) as lost:
        relay(queue.Queue(), ended, Hooks(), SimpleNamespace(set=lambda: None))
    assert lost.value.message == "training process 0 of 2 ended without an answer; a resumable state, if any, is kept"
    killed = [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=-9)]
    with pytest.raises(FastBackendError) as dead:
        relay(queue.Queue(), killed, Hooks(), SimpleNamespace(set=lambda: None))
    assert dead.value.message.startswith("training process 1 of 2 ended with exit code -9")


@pytest.mark.slow
def test_a_stop_reaches_every_process_and_the_run_resumes(tiny_models, data_root, monkeypatch):
    import threading

    from fastbackend import stopping
    from fastbackend.api.train import train_with_yaml
    from fastbackend.errors import FastBackendError
    from fastbackend.schemas import TrainWithYamlRequest

    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos(count=2)
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "2")
    stop = threading.Event()

    def progress(info: dict) -> None:
        if info["stage"] == "training" and info["step"] >= 3:
            stop.set()  # what the worker's handler does on a cancel

    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config=user_yaml(model_path, "sd15", steps=40))
    with pytest.raises(FastBackendError) as stopped, stopping.watching(stop):
        train_with_yaml(request, progress=progress)
    assert stopped.value.code == "stopped", stopped.value
    step = int(stopped.value.message.split(" at step ")[1].split(":")[0])
    assert 3 <= step < 40
    assert (data_root / "output" / "nowy_dataset_1.3" / f"nowy_dataset_1.3_{step:09d}.safetensors").exists()
    again = train_with_yaml(request)
    assert again["resumed_from_step"] == step and again["steps"] == 40 and again["processes"] == 2


def test_a_process_stops_when_asked_or_when_its_worker_is_gone():
    import os
    import threading

    from fastbackend.training.distributed import process_hooks

    stop = threading.Event()
    hooks = process_hooks(True, None, stop, os.getppid())
    assert not hooks.should_stop()
    stop.set()
    assert hooks.should_stop()
    orphan = process_hooks(False, None, threading.Event(), parent=os.getppid() + 1)  # another parent: gone
    assert orphan.should_stop()


def test_never_more_processes_than_gpus(monkeypatch):
    import torch

    from fastbackend.training.distributed import process_count

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    warnings: list[str] = []
    assert process_count("cuda:0", warnings) == 2 and warnings == []  # one per visible GPU
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "4")
    assert process_count("cuda:0", warnings) == 2
    assert warnings == ["FASTBACKEND_PROCESSES=4: only 2 GPU(s) here; training in 2 processes"]
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "1")
    assert process_count("cuda:0", []) == 1
    assert process_count("cpu", []) == 1


@pytest.mark.slow
def test_a_run_saved_by_two_processes_resumes_in_one_and_says_so(tiny_models, data_root, monkeypatch):
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos(count=2)
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "2")
    config = user_yaml(model_path, "sd15", steps=4, replacements={"save_every: 2000": "save_every: 2"})
    first = train(config)
    assert first["status"] == "success" and first["processes"] == 2, first
    monkeypatch.setenv("FASTBACKEND_PROCESSES", "1")  # the next worker has one GPU
    more = config.replace("steps: 4", "steps: 6")
    again = train(more)
    assert again["status"] == "success" and again["processes"] == 1, again
    assert again["resumed_from_step"] == 4 and again["steps"] == 6
    assert any("trained in 2 process(es) on 0 GPU(s), this run in 1 on 0" in w for w in again["warnings"])


def test_gpu_random_streams_are_restored_only_onto_gpus_this_host_has(monkeypatch):
    """A CUDA state of N GPUs cannot load whole onto fewer (torch indexes devices that are not there)."""
    import torch

    from fastbackend.training import checkpoint

    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    warnings: list[str] = []
    two = {"processes": 2, "rng": {"cuda": [torch.zeros(8), torch.zeros(8)]}}
    checkpoint.restore_gpu_streams(two, 1, warnings)
    assert restored == [0] and len(warnings) == 1 and "in 2 process(es) on 2 GPU(s), this run in 1 on 1" in warnings[0]
    one = {"rng": {"cuda": [torch.zeros(8)]}}  # an older state: one process, no count recorded
    checkpoint.restore_gpu_streams(one, 1, warnings)
    assert restored == [0, 0] and len(warnings) == 1


def test_a_stop_in_a_training_process_is_said_with_what_the_worker_heard(monkeypatch):
    """Only the worker's own process hears SIGTERM: a stop relayed from a training process says
    the shutdown stopped it, and what to resend, as a one-process run would."""
    from fastbackend import stopping
    from fastbackend.errors import error_response
    from fastbackend.training.distributed import stopped_here

    message = "training stopped by a cancel or the execution timeout at step 7: step 7 is saved; send it again"
    monkeypatch.setattr(stopping, "_shutting_down", True)
    answer = error_response(stopped_here(message, {"resend": "send the same train_with_yaml again"}))
    assert answer["error"].startswith("training stopped by the worker shutting down at step 7")
    assert answer["stopped_by"] == "shutdown" and answer["resend"] == "send the same train_with_yaml again"
