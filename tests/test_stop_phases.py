"""A stop (RunPod's cancel or execution timeout, or the worker's shutdown) ends every phase of every
request within ``BOUND_S`` of the signal, with an answer that names the phase, and leaves nothing
half-written or listed.

Each phase is made long on purpose (a slow hub, a slow load, slow images, slow steps) and the job's
stop event is set once the phase is under way, exactly as ``handler_fast.async_handler`` sets it on
a cancel; the time from the signal to the answer is measured.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

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


def slow(started: threading.Event, seconds: float = SLOW_S):
    """A stand-in for work that takes ``seconds`` in small Python steps, saying when it began."""

    def run(*args, **kwargs):
        started.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
        raise AssertionError("the stop was not seen")

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


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def test_an_interruptible_block_ends_within_a_poll_naming_its_phase():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    stopped = pytest.raises(stopping.JobStopped, match=r"^loading the base model stopped by a cancel")
    with stopped, stopping.interruptible("loading the base model", stop.is_set):
        busy(SLOW_S)
    assert time.monotonic() - started < 0.3 + 1.0


def test_an_interruptible_block_reads_the_jobs_own_stop_request():
    stop = threading.Event()
    outcome: list[BaseException | None] = []

    def job() -> None:
        with stopping.watching(stop):
            try:
                with stopping.interruptible("loading"):  # should_stop: this thread's job, seen from the watcher
                    stop.set()
                    busy(SLOW_S)
            except stopping.JobStopped as exc:
                outcome.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(SLOW_S)
    assert len(outcome) == 1 and isinstance(outcome[0], stopping.JobStopped)


def test_no_interruption_lands_after_the_block_whenever_the_stop_comes():
    """The watcher's shot raced against the block's end many times (blocks ending around its first
    poll): it lands inside the block or its exit (JobStopped from the with statement), never in the
    code after it. (The exit's withdrawal of an exception still on its way closes a window too
    narrow for a test to hit at will.)"""
    rng = random.Random(7)
    outcomes = {"finished": 0, "stopped": 0}
    for _ in range(40):
        try:
            with stopping.interruptible("racing", lambda: True):
                busy(rng.uniform(0.5, 1.5) * stopping.INTERRUPT_POLL_S)
            outcomes["finished"] += 1
        except stopping.JobStopped:
            outcomes["stopped"] += 1
        busy(stopping.INTERRUPT_POLL_S)  # after the block: nothing may arrive here
    assert outcomes["finished"] and outcomes["stopped"], outcomes


def test_a_block_left_by_its_own_error_keeps_it_when_no_stop_came():
    with pytest.raises(ValueError, match="its own"), stopping.interruptible("loading", lambda: False):
        raise ValueError("its own")


# ---------------------------------------------------------------- every phase of a training


def test_a_stop_while_the_base_model_loads(tiny_models, data_root, monkeypatch):
    import diffusers

    started = threading.Event()
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", slow(started))
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer, seconds = stopped_during({"type": "train_with_yaml", "yaml_config": user_yaml(model_path)}, started)
    assert_stopped(answer, seconds, "loading the base model")
    assert listed_models() == [] and not (data_root / "output" / "nowy_dataset_1.3").exists()


def test_a_stop_while_latents_are_cached(tiny_models, data_root, monkeypatch):
    from fastbackend.training import data

    started = threading.Event()
    real_encode = data.encode_example

    def slow_encode(example, encode):
        started.set()
        time.sleep(1.0)  # one image of a real size on a slow GPU
        return real_encode(example, encode)

    monkeypatch.setattr(data, "encode_example", slow_encode)
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
    real_look = dataset_report.look_at

    def slow_look(path: Path):
        started.set()
        time.sleep(1.0)
        return real_look(path)

    monkeypatch.setattr(dataset_report, "look_at", slow_look)
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
    from transformers import Florence2ForConditionalGeneration

    started = threading.Event()
    monkeypatch.setattr(Florence2ForConditionalGeneration, "from_pretrained", slow(started))
    answer, seconds = stopped_during(captioned_upload(), started)
    assert_stopped(answer, seconds, "loading the captioner")
    assert not (data_root / "training_data" / "matt").exists()


def test_a_stop_while_photos_are_captioned(data_root, captioner, monkeypatch):
    from fastbackend import captions

    started = threading.Event()
    real_call = captions.Captioner.__call__

    def slow_call(self, images):
        started.set()
        time.sleep(1.0)
        return real_call(self, images)

    monkeypatch.setattr(captions, "BATCH", 2)
    monkeypatch.setattr(captions.Captioner, "__call__", slow_call)
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

    def slow_forward(self, *args, **kwargs):
        started.set()
        time.sleep(0.5)  # one step of a full-size model
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "forward", slow_forward)
    job = {"type": "generate", "model": "nowy_dataset_1.3", "prompt": "Matt", "width": 64, "height": 64, "steps": 60}
    answer, seconds = stopped_during(job, started)
    assert_stopped(answer, seconds, "generating")
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "forward", real_forward)
    again = handler_fast.handler({"id": "g", "input": job | {"steps": 2}})  # the kept pipeline holds no adapter
    assert again["status"] == "success", again
