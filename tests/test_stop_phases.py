"""A stop (RunPod's cancel or execution timeout, or the worker's shutdown) ends every phase of every
request within ``BOUND_S`` of the signal, with an answer that names the phase, and leaves nothing
half-written or listed.

Each phase is made long on purpose (a slow hub, a slow load, slow images, slow steps) and the job's
stop event is set once the phase is under way, exactly as ``handler_fast.async_handler`` sets it on
a cancel; the time from the signal to the answer is measured.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import handler_fast
from fastbackend import stopping
from fastbackend.storage import TEMP_SUFFIX
from tests.photos import b64, nine_photos
from tests.training_helpers import install_model, train, upload_photos, user_yaml

BOUND_S = 5.0  # the promise, on a real worker: every phase stops within this of the signal
SLOW_S = 30.0  # how long each phase would take if the stop went unseen


def stopped_during(job_input: dict, started: threading.Event, wait_s: float = 120) -> tuple[dict, float]:
    """Run ``job_input`` as the worker does, set its stop event once ``started`` is set, and return
    the answer and the seconds from the signal to the answer."""
    stop = threading.Event()
    answers: list[dict] = []
    job = {"id": "j", "input": job_input}
    work = threading.Thread(target=lambda: answers.append(handler_fast._handle_watching(job, stop)))
    work.start()
    assert started.wait(wait_s), "the phase never started"
    signalled = time.monotonic()
    stop.set()
    work.join(SLOW_S + 30)
    assert answers, "the job did not end"
    return answers[0], time.monotonic() - signalled


def slowed(real, started: threading.Event, seconds: float = 1.0):
    """``real`` made slow (a unit of work of a real size), saying when it was first called."""

    def run(*args, **kwargs):
        started.set()
        time.sleep(seconds)
        return real(*args, **kwargs)

    return run


def assert_stopped(answer: dict, seconds: float, phase: str) -> None:
    assert answer["error_code"] == "stopped", answer
    assert phase in answer["error"], answer["error"]
    assert answer["stopped_by"] == "cancel_or_timeout" and answer["resend"], answer
    assert seconds < BOUND_S, f"{phase}: stopped {seconds:.1f}s after the signal"


def listed_models() -> list[str]:
    answer = handler_fast.handler({"id": "l", "input": {"type": "list_models"}})
    return [model["name"] for model in answer["models"]]


# ---------------------------------------------------------------- the mechanism


def test_a_load_checks_between_its_steps_and_only_inside_its_block():
    from fastbackend.training.families.base import LOADER_STEPS, watch_diffusers_loaders

    stop = threading.Event()
    stop.set()
    stopping.check_load()  # outside a load: nothing to stop
    stopped = pytest.raises(stopping.JobStopped, match=r"^loading the base model stopped by a cancel")
    with stopped, stopping.stoppable_load("loading the base model", stop.is_set):
        stopping.check_load()
    watch_diffusers_loaders()
    import importlib

    assert all(getattr(getattr(importlib.import_module(m), n), "checks_stop", False) for m, n in LOADER_STEPS)


def test_moving_a_model_checks_between_its_blocks():
    from fastbackend.training.families.base import move_to

    blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), blocks)
    checks: list[int] = []
    move_to(model, "cpu", lambda: checks.append(1))
    assert len(checks) == 4  # the first layer and each block of the list


# ---------------------------------------------------------------- every phase of a training


def test_a_stop_while_the_base_model_loads(tiny_models, data_root, monkeypatch):
    """The real from_pretrained, each weights file made slow (a network volume): it stops between steps."""
    from diffusers.models import modeling_utils

    started = threading.Event()
    monkeypatch.setattr(modeling_utils, "_load_shard_file", slowed(modeling_utils._load_shard_file, started))
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer, seconds = stopped_during({"type": "train_with_yaml", "yaml_config": user_yaml(model_path)}, started)
    assert_stopped(answer, seconds, "loading the base model")
    assert listed_models() == [] and not (data_root / "output" / "nowy_dataset_1.3").exists()


def test_a_stop_while_latents_are_cached(tiny_models, data_root, monkeypatch):
    from fastbackend.training import data

    started = threading.Event()
    monkeypatch.setattr(data, "encode_example", slowed(data.encode_example, started))
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos(9)
    text = user_yaml(model_path)
    assert "cache_latents_to_disk: true" in text  # the user's config keeps latents on the volume
    answer, seconds = stopped_during({"type": "train_with_yaml", "yaml_config": text}, started)
    assert_stopped(answer, seconds, "caching latents and captions")
    assert listed_models() == []
    assert [p for p in (data_root / "training_data").rglob("*") if p.name.endswith(TEMP_SUFFIX)] == []


def test_a_stop_while_the_datasets_are_analyzed(tiny_models, data_root, monkeypatch):
    from fastbackend import dataset_report

    started = threading.Event()
    monkeypatch.setattr(dataset_report, "look_at", slowed(dataset_report.look_at, started))
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos(9)
    answer, seconds = stopped_during({"type": "train_with_yaml", "yaml_config": user_yaml(model_path)}, started)
    assert_stopped(answer, seconds, "analyzing dataset 'matt_training_test'")
    assert listed_models() == []


# ---------------------------------------------------------------- uploads with captions, generate


@pytest.fixture
def captioner(tiny_captioner, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_MODEL_DIRS", str(tiny_captioner.parent))
    monkeypatch.setenv("FASTBACKEND_CAPTION_MODEL", str(tiny_captioner))
    from fastbackend.training import pipeline_cache

    pipeline_cache.release()  # a captioner kept by an earlier test would skip the load
    return tiny_captioner


def captioned_upload() -> dict:
    files = [{"filename": name, "content": b64(data)} for name, data, _ in nine_photos()]
    return {"type": "upload_training_data", "training_name": "matt", "files": files, "auto_caption": True}


def test_a_stop_while_the_captioner_loads(data_root, captioner, monkeypatch):
    """A small model: its parts load whole (a second each here, made slow), the stop is seen between them."""
    from transformers import Florence2ForConditionalGeneration

    started = threading.Event()
    real_load = Florence2ForConditionalGeneration.from_pretrained
    monkeypatch.setattr(Florence2ForConditionalGeneration, "from_pretrained", slowed(real_load, started))
    answer, seconds = stopped_during(captioned_upload(), started)
    assert_stopped(answer, seconds, "loading the captioner")
    assert not (data_root / "training_data" / "matt").exists()


def test_a_stop_while_photos_are_captioned(data_root, captioner, monkeypatch):
    from fastbackend import captions

    started = threading.Event()
    monkeypatch.setattr(captions, "BATCH", 2)
    monkeypatch.setattr(captions.Captioner, "__call__", slowed(captions.Captioner.__call__, started))
    answer, seconds = stopped_during(captioned_upload(), started)
    assert_stopped(answer, seconds, "captioning")
    assert not (data_root / "training_data" / "matt").exists()


def test_a_stop_while_generate_renders(tiny_models, data_root, monkeypatch):
    import diffusers

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    assert train(user_yaml(model_path, steps=2))["status"] == "success"
    started = threading.Event()
    real_forward = diffusers.FluxTransformer2DModel.forward
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "forward", slowed(real_forward, started, 0.5))
    job = {"type": "generate", "model": "nowy_dataset_1.3", "prompt": "Matt", "width": 64, "height": 64, "steps": 60}
    answer, seconds = stopped_during(job, started)
    assert_stopped(answer, seconds, "generating")
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "forward", real_forward)
    again = handler_fast.handler({"id": "g", "input": job | {"steps": 2}})  # the kept pipeline holds no adapter
    assert again["status"] == "success", again


def test_a_stop_mid_sample_leaves_the_image_unmade_and_saves_the_step(tiny_models, data_root, monkeypatch):
    """A sample at full size takes half a minute: the round ends between two denoising steps."""
    import diffusers

    from fastbackend.layout import LoraFolder
    from fastbackend.training import sampling

    started = threading.Event()
    real_forward = diffusers.FluxTransformer2DModel.forward
    in_sampling = threading.local()
    real_sample = sampling.sample

    def sample(run, should_stop=lambda: False):
        in_sampling.on = True
        try:
            return real_sample(run, should_stop)
        finally:
            in_sampling.on = False

    def slow_forward(self, *args, **kwargs):
        if getattr(in_sampling, "on", False):
            started.set()
            time.sleep(0.5)  # one step of a full-size model
        return real_forward(self, *args, **kwargs)

    from fastbackend.training import trainer

    monkeypatch.setattr(trainer, "sample", sample)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "forward", slow_forward)
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    text = user_yaml(model_path, steps=50, replacements={"sample_every: 100": "sample_every: 1"})
    text = text.replace("sample_steps: 2", "sample_steps: 60")
    answer, seconds = stopped_during({"type": "train_with_yaml", "yaml_config": text}, started)
    assert answer["error_code"] == "stopped" and "at step 1" in answer["error"], answer
    assert seconds < BOUND_S, seconds
    folder = LoraFolder(data_root / "output" / "nowy_dataset_1.3")
    assert list(folder.samples.glob("*")) == [] and folder.step_save(1).is_file()
