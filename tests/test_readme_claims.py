"""README sentences that had no test: each test names the claim it proves."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from handler_fast import handler
from tests.photos import b64, nine_photos, photo
from tests.test_upload import file_entries, upload
from tests.training_helpers import install_model, train, upload_photos, user_yaml


def call(**payload) -> dict:
    return handler({"id": "c", "input": payload})


# ---------------------------------------------------------------- the contract's error codes


def test_invalid_name_is_what_storage_answers_for_a_bad_name():
    from fastbackend.errors import FastBackendError
    from fastbackend.storage import check_name

    with pytest.raises(FastBackendError, match=r"^model: must be 1-64 characters") as caught:
        check_name("../x", "model")
    assert caught.value.code == "invalid_name"


def test_paths_outside_the_data_root_are_path_outside_root(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    outside = train(user_yaml(model_path).replace("training_folder: output", "training_folder: /etc"))
    assert outside["error_code"] == "path_outside_root"
    assert outside["error"].startswith("config.process[0].training_folder: path '/etc' is outside the data root")
    model = train(user_yaml("/etc/models/flux"))
    assert model["error_code"] == "path_outside_root"


def test_bad_yaml_is_invalid_config_and_an_oversized_one_too():
    assert call(type="train_with_yaml", yaml_config="job: [unclosed")["error_code"] == "invalid_config"
    big = call(type="train_with_yaml", yaml_config="# " + "x" * 256_001)
    assert big["error_code"] == "invalid_config"
    assert big["error"] == "yaml_config: 256,003 bytes is over the 256,000-byte limit"


def test_a_lora_this_worker_did_not_make_is_unknown_lora(data_root):
    from tests.test_model_files import make_lora

    make_lora(data_root, model="nowy_dataset_1.3")
    path = data_root / "output" / "nowy_dataset_1.3" / "nowy_dataset_1.3.safetensors"
    from safetensors.numpy import save_file

    save_file({"x": __import__("numpy").zeros(4, dtype="float32")}, str(path))  # no header at all
    answer = call(type="generate", model="nowy_dataset_1.3", prompt="a photo")
    assert answer["error_code"] == "unknown_lora"
    assert (
        answer["error"]
        == "input.model: 'nowy_dataset_1.3.safetensors' was not made by this worker (no base model in its header)"
    )


# ---------------------------------------------------------------- logs carry no payloads or secrets


def test_logs_never_carry_base64_payloads_or_the_hub_token(tiny_models, data_root, monkeypatch, caplog):
    token = "hf_sentinelTOKEN0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    model_path = install_model(tiny_models, data_root, "flux")
    photo_b64 = b64(nine_photos()[0][1])
    assert (
        call(
            type="upload_training_data",
            training_name="matt_training_test",
            files=[{"filename": "IMG_0000.jpg", "content": photo_b64, "caption": "Matt"}],
        )["status"]
        == "success"
    )
    trained = train(user_yaml(model_path, steps=1))
    assert trained["status"] == "success", trained
    chunk = call(type="download_model", model="nowy_dataset_1.3", length=1000)["content"]
    sample = call(type="get_samples", model="nowy_dataset_1.3")["images"][0]["content"]
    image = call(type="generate", model="nowy_dataset_1.3", prompt="Matt", width=64, height=64, steps=1)
    for answer in (call(type="health"), call(type="list_models"), call(type="list_datasets")):
        assert answer["status"] in ("healthy", "success")
    assert call(type="delete_model", model="nowy_dataset_1.3")["status"] == "success"
    assert call(type="delete_dataset", training_name="matt_training_test")["status"] == "success"
    logged = caplog.text
    assert token not in logged and token not in json.dumps(trained)
    for payload in (photo_b64, chunk, sample, image["images"][0]["content"]):
        assert payload[:64] not in logged


# ---------------------------------------------------------------- uploads


def test_webp_photos_are_accepted(data_root):
    answer = upload(files=[{"filename": "a.webp", "content": b64(photo(400, 300, "WEBP")), "caption": "Matt"}])
    assert answer["status"] == "success" and answer["uploaded_files"][0]["width"] == 400


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Serves /big (2,000 bytes) and /slow (answers after 2 s)."""

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(2)
        body = b"\0" * 2000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_size_cap_and_timeout_follow_the_environment(slow_server, data_root, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("FASTBACKEND_MAX_URL_BYTES", "1000")
    monkeypatch.setenv("FASTBACKEND_URL_TIMEOUT_S", "0.5")
    answer = upload(urls=[f"{slow_server}/big.jpg", f"{slow_server}/slow"])
    assert answer["details"][0] == f"input.urls[0] ({slow_server}/big.jpg): is 2,000 bytes, over the 1,000-byte limit"
    assert answer["details"][1] == f"input.urls[1] ({slow_server}/slow): could not be fetched (ReadTimeout)"


def test_the_manifest_is_written_last_and_atomically(data_root, monkeypatch):
    from fastbackend import datasets

    written = []
    real_write, real_move = datasets.atomic_write_bytes, datasets.move_into_place
    monkeypatch.setattr(
        datasets, "atomic_write_bytes", lambda path, data: (written.append(path.name), real_write(path, data))
    )
    monkeypatch.setattr(
        datasets, "move_into_place", lambda source, path: (written.append(path.name), real_move(source, path))
    )
    from fastbackend.layout import DatasetFolder

    real_manifest = DatasetFolder.write_manifest
    monkeypatch.setattr(
        DatasetFolder, "write_manifest", lambda self, m: (written.append("manifest"), real_manifest(self, m))
    )
    assert upload(files=file_entries(nine_photos()[:2]))["status"] == "success"
    assert written[-1] == "manifest" and set(written[:-1]) == {
        "IMG_0000.jpg",
        "IMG_0001.jpg",
        "IMG_0000.txt",
        "IMG_0001.txt",
    }


def test_training_reads_only_what_the_manifest_lists(data_root):
    from fastbackend.training import data

    upload(files=file_entries(nine_photos()[:2]))
    folder = data_root / "training_data" / "matt"
    (folder / "IMG_9999.jpg").write_bytes(photo(400, 400))  # a leftover of a killed upload
    assert [item.path.name for item in data.read_items(folder, None)] == ["IMG_0000.jpg", "IMG_0001.jpg"]


def test_decode_threads_follow_the_environment(data_root, monkeypatch):
    from fastbackend import datasets

    seen = []
    real = datasets.ThreadPoolExecutor
    monkeypatch.setattr(
        datasets, "ThreadPoolExecutor", lambda max_workers: (seen.append(max_workers), real(max_workers))[1]
    )
    monkeypatch.setenv("FASTBACKEND_DECODE_THREADS", "3")
    assert upload(files=file_entries(nine_photos()[:5]))["status"] == "success"
    assert seen == [3]


def test_runsync_jobs_get_the_runsync_limit(monkeypatch):
    monkeypatch.setenv("FASTBACKEND_RUN_LIMIT_BYTES", "100")
    monkeypatch.setenv("FASTBACKEND_RUNSYNC_LIMIT_BYTES", "300")
    job = {"input": {"type": "health", "deep": False, "x": "y" * 150}}
    assert handler({"id": "run-1", **job})["error_code"] == "payload_too_large"
    assert handler({"id": "sync-1", **job})["error_code"] == "validation_error"  # past the size check


def test_lock_timeout_follows_the_environment(data_root, monkeypatch):
    from fastbackend.storage import locked

    monkeypatch.setenv("FASTBACKEND_LOCK_TIMEOUT_S", "0.2")
    folder = data_root / "training_data" / "matt"
    with locked(folder):
        started = time.monotonic()
        answer = upload(files=file_entries(nine_photos()[:1]))
    assert answer["error_code"] == "locked" and time.monotonic() - started < 5
    assert answer["error"] == "'matt' is in use by another job (waited 0.2s)"


# ---------------------------------------------------------------- training prose


def test_every_step_draws_a_fresh_latent_from_the_cached_posterior(tiny_models, data_root):
    from fastbackend.training import trainer
    from tests.test_config_effects import set_up_run

    run = set_up_run(tiny_models, data_root, "sd15", {})
    example = run.sampler.examples[0]
    run.sampler.next_batch = lambda: [example]
    first, second = trainer.next_batch(run).latents, trainer.next_batch(run).latents
    assert example.mean is not None and not torch.equal(first, second)
    scale = run.pipe.vae.config.scaling_factor
    assert torch.allclose((first + second) / 2 / scale, example.mean.unsqueeze(0), atol=6 * example.std.max())


@pytest.mark.parametrize(("cached", "offloaded"), [(True, True), (False, False)])
def test_encoders_leave_the_device_once_everything_is_cached(cached, offloaded, tiny_models, data_root, monkeypatch):
    from fastbackend.training import caching
    from tests.test_config_effects import set_up_run

    calls = []
    monkeypatch.setattr(caching, "offload_encoders", lambda family, pipe: calls.append(family.name))
    change = {} if cached else {"dtype: bf16": "dtype: bf16\n      cache_text_embeddings: false"}
    set_up_run(tiny_models, data_root, "sd15", change)
    assert bool(calls) == offloaded


def test_the_resumable_state_holds_everything_a_resume_needs(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    assert train(user_yaml(model_path, steps=2))["status"] == "success"
    state = torch.load(data_root / "output" / "nowy_dataset_1.3" / "training_state.pt", weights_only=False)
    assert set(state) == {
        "step",
        "fingerprint",
        "lora",
        "optimizer",
        "optimizer_class",
        "lr_scheduler",
        "ema",
        "grads",
        "history",
        "likeness",
        "saves",
        "sha256",
        "rng",
        "processes",
        "scaler",
    }
    assert set(state["rng"]) == {"captions", "batches", "torch", "cuda"}
    assert state["step"] == 2 and state["ema"] is not None


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from fastbackend.storage import atomic_write_bytes, temporary_path

    target = tmp_path / "x.safetensors"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), temporary_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


# ---------------------------------------------------------------- models and generate


def test_download_model_serves_a_step_save_by_filename(data_root):
    from tests.test_model_files import make_lora

    path = make_lora(data_root, filename="matt_000000250.safetensors")
    answer = call(type="download_model", model="matt", filename="matt_000000250.safetensors")
    assert answer["status"] == "success" and base64.b64decode(answer["content"]) == path.read_bytes()


def test_generate_passes_the_negative_prompt_and_caps_images(tiny_models, data_root, monkeypatch):
    from diffusers import StableDiffusionPipeline

    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    assert train(user_yaml(model_path, "sd15", steps=1))["status"] == "success"
    seen = {}
    real = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    answer = call(
        type="generate", model="nowy_dataset_1.3", prompt="Matt", negative_prompt="blurry", width=64, height=64, steps=1
    )
    assert answer["status"] == "success" and seen["negative_prompt"] == ["blurry"]  # one per image
    five = call(type="generate", model="nowy_dataset_1.3", prompt="Matt", num_images=5)
    assert five["error"] == "input.num_images: must be <= 4, got 5"


def test_training_drops_the_warm_generate_pipeline(tiny_models, data_root):
    from fastbackend.training import pipeline_cache

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    assert train(user_yaml(model_path, steps=1))["status"] == "success"
    assert (
        call(type="generate", model="nowy_dataset_1.3", prompt="Matt", width=64, height=64, steps=1)["status"]
        == "success"
    )
    assert len(pipeline_cache._loaded) == 1
    assert train(user_yaml(model_path, steps=2), resume=False)["status"] == "success"
    assert pipeline_cache._loaded == {}


# ---------------------------------------------------------------- the client


def test_the_log_level_follows_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, FASTBACKEND_DATA_DIR=str(tmp_path), FASTBACKEND_LOG_LEVEL="WARNING")
    job = '{"input": {"type": "nope"}}'
    quiet = subprocess.run(
        [sys.executable, str(repo / "handler_fast.py"), "--test_input", job],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    env["FASTBACKEND_LOG_LEVEL"] = "ERROR"
    silent = subprocess.run(
        [sys.executable, str(repo / "handler_fast.py"), "--test_input", job],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "job local_test refused" in quiet.stdout + quiet.stderr  # a warning
    assert "job local_test refused" not in silent.stdout + silent.stderr


def test_every_request_type_has_its_section_in_the_contract():
    """The contract documents every `input.type` the handler dispatches, each under a heading of its own."""
    from handler_fast import OPERATIONS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("### ")]
    assert [name for name in OPERATIONS if not any(f"`{name}`" in heading for heading in headings)] == []
