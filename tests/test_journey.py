"""The user's whole road: the client on a laptop, RunPod's job API, real worker processes, the volume.

The endpoint is devtools/endpoint.py on loopback; each worker is ``python -u handler_fast.py``
taking jobs through runpod's own fetch, stop-signal and result code; the client is the one the
README tells users to run. RunPod's waits and timeouts are scaled down (``time_scale``).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from devtools.endpoint import Endpoint
from devtools.photos import synthetic_photo
from fastbackend import client
from tests.training_helpers import user_yaml

pytestmark = pytest.mark.slow
DATASET = "matt_training_test"  # the one the user's YAML trains on
WORKER_ENV = {
    "FASTBACKEND_PROGRESS_INTERVAL_S": "0.1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def photo_folder(folder: Path, count: int, width: int, height: int) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"matt_{index:02d}.jpg").write_bytes(synthetic_photo(width, height + 100 * (index % 3), seed=index))
        (folder / f"matt_{index:02d}.txt").write_text(f"Matt, photo {index}\n")
    return folder


def volume(root: Path, tiny_models: Path) -> Path:
    """A network volume with the tiny FLUX model where the user's config names it."""
    shutil.copytree(tiny_models / "flux", root / "models" / "flux")
    return root


def config(name: str = "nowy_dataset_1.3", steps: int = 6, every: int = 3) -> str:
    return user_yaml(
        "/workspace/models/flux",
        steps=steps,
        replacements={
            "name: nowy_dataset_1.3": f"name: {name}",
            "sample_every: 100": f"sample_every: {every}",
            "save_every: 2000": f"save_every: {every}",
        },
    )


def user(endpoint: Endpoint, **kwargs) -> client.Client:
    return client.Client(endpoint.url, endpoint.api_key, out=io.StringIO(), poll_s=0.05, backoff_s=0.05, **kwargs)


def test_photos_on_a_laptop_to_a_downloaded_lora_through_the_endpoint(tmp_path, tiny_models, monkeypatch):
    photos = photo_folder(tmp_path / "photos", 12, 1500, 1300)
    assert sum(p.stat().st_size for p in photos.glob("*.jpg")) > 10_000_000
    data = volume(tmp_path / "volume", tiny_models)
    with Endpoint(tmp_path / "endpoint", time_scale=0.01) as endpoint:  # /runsync holds 0.9 s
        endpoint.start_worker(data, WORKER_ENV)
        endpoint.wait_until_ready()
        laptop = user(endpoint)
        uploaded = laptop.upload_folder(DATASET, photos)
        assert uploaded["requests"] >= 2 and uploaded["total_images"] == 12

        started = time.monotonic()
        trained = laptop.train(config())
        assert time.monotonic() - started > 90 * 0.01  # longer than /runsync would have held it
        shown = laptop.out.getvalue()
        assert "sent; follow it: python -m fastbackend.client --url" in shown
        for stage in ("loading_model", "caching", "sampling (step 3)", "saving (step 3)", "6/6"):
            assert stage in shown, (stage, shown)
        assert trained["steps"] == 6 and trained["samples"]

        # The network drops once in the middle of the download: retried, and the file is whole.
        real_request = laptop.session.request
        calls = []

        def cut_once(method, url, **kwargs):
            calls.append(url)
            if len(calls) == 3:
                raise requests.ConnectionError("connection reset by peer")
            return real_request(method, url, **kwargs)

        monkeypatch.setattr(laptop.session, "request", cut_once)
        downloaded = laptop.download(trained["model"], tmp_path, chunk_bytes=20_000)
        on_volume = data / "output" / trained["model"] / trained["filename"]
        assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == hashlib.sha256(on_volume.read_bytes()).hexdigest()
        assert len(calls) > 4 and not list(tmp_path.glob("*.part"))


def test_ctrl_c_cancels_a_training_on_the_endpoint_and_the_worker_takes_the_next_job(tmp_path, tiny_models):
    photos = photo_folder(tmp_path / "photos", 3, 512, 512)
    data = volume(tmp_path / "volume", tiny_models)
    with Endpoint(tmp_path / "endpoint", time_scale=0.01) as endpoint:
        (worker,) = [endpoint.start_worker(data, WORKER_ENV)]
        endpoint.wait_until_ready()
        laptop = user(endpoint)
        laptop.upload_folder(DATASET, photos)
        real_status, seen = laptop.status, {}

        def ctrl_c_once_training(job_id):
            view = real_status(job_id)
            step = (view.get("output") or {}).get("step") or 0
            if "pressed" not in seen and view.get("status") == "IN_PROGRESS" and step >= 3:
                seen["pressed"] = time.monotonic()
                raise KeyboardInterrupt
            return view

        laptop.status = ctrl_c_once_training  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            laptop.train(config("long_run", steps=100_000, every=100_000))
        assert "CANCELLED. The worker keeps the newest step save" in laptop.out.getvalue()
        laptop.status = real_status  # type: ignore[method-assign]
        answer = laptop.call({"type": "health"})  # the worker is free again, within a few seconds
        assert answer["status"] == "healthy" and time.monotonic() - seen["pressed"] < 15
        assert endpoint.queue.taken_by[worker.id] == 3  # the upload, the training, the health check
        assert (data / "output" / "long_run" / "training_state.pt").is_file()  # saved as it stopped
        assert "stopped" in worker.log.read_text()


def test_the_default_execution_timeout_stops_a_run_with_a_save_and_sending_it_again_resumes(tmp_path, tiny_models):
    photos = photo_folder(tmp_path / "photos", 3, 512, 512)
    data = volume(tmp_path / "volume", tiny_models)
    with Endpoint(tmp_path / "endpoint", time_scale=0.015) as endpoint:  # the default 600 s -> 9 s
        endpoint.start_worker(data, WORKER_ENV)
        endpoint.wait_until_ready()
        laptop = user(endpoint)
        laptop.upload_folder(DATASET, photos)
        payload = {"type": "train_with_yaml", "yaml_config": config("timed", steps=400, every=1000)}
        view = laptop.submit(payload, "run")  # as a client that sends no policy: the endpoint's default
        with pytest.raises(client.JobStopped, match="stopped by the endpoint's execution timeout"):
            laptop.follow(view)
        state = data / "output" / "timed" / "training_state.pt"
        deadline = time.monotonic() + 30
        while not state.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state.is_file()
        again = laptop.train(payload["yaml_config"])  # the client's own policy: hours, scaled
        assert again["steps"] == 400 and 0 < again["resumed_from_step"] < 400


def test_two_workers_with_separate_volumes_still_train_the_users_photos(tmp_path, tiny_models):
    photos = photo_folder(tmp_path / "photos", 3, 512, 512)
    with Endpoint(tmp_path / "endpoint", time_scale=0.01) as endpoint:
        first = endpoint.start_worker(volume(tmp_path / "volume-1", tiny_models), WORKER_ENV, datacenter="EU-RO-1")
        endpoint.wait_until_ready()
        laptop = user(endpoint)
        laptop.upload_folder(DATASET, photos)  # lands on the first volume
        endpoint.stop_workers([first])  # RunPod scales it down; the next worker has the other volume
        second = endpoint.start_worker(volume(tmp_path / "volume-2", tiny_models), WORKER_ENV, datacenter="US-KS-2")
        endpoint.wait_until_ready()

        with pytest.raises(client.WorkerError) as refused:
            laptop.train(config())
        message = str(refused.value)
        assert message.startswith("invalid_dataset: ") and "US-KS-2" in message
        assert f"at {second.volume}" in message and "does not share datasets" in message
        assert not (second.volume / "output" / "nowy_dataset_1.3").exists()

        trained = laptop.train(config(), photos=photos)
        assert (second.volume / "output" / "nowy_dataset_1.3" / trained["filename"]).is_file()
        held = sorted(p.name for p in (second.volume / "training_data" / DATASET).glob("*.jpg"))
        assert held == sorted(p.name for p in photos.glob("*.jpg"))


def test_a_worker_shut_down_mid_training_saves_and_the_client_sends_the_job_again(tmp_path, tiny_models):
    photos = photo_folder(tmp_path / "photos", 3, 512, 512)
    data = volume(tmp_path / "volume", tiny_models)
    with Endpoint(tmp_path / "endpoint", time_scale=0.01) as endpoint:
        first = endpoint.start_worker(data, WORKER_ENV)
        endpoint.wait_until_ready()
        laptop = user(endpoint)
        laptop.upload_folder(DATASET, photos)
        real_status, events = laptop.status, []

        def scale_down_at_step_3(job_id):
            view = real_status(job_id)
            step = (view.get("output") or {}).get("step") or 0
            if not events and view.get("workerId") == first.id and step >= 3:
                events.append(endpoint.start_worker(data, WORKER_ENV))  # RunPod brings up another worker
                threading.Thread(target=endpoint.stop_workers, args=([first],)).start()  # and SIGTERMs this one
            return view

        laptop.status = scale_down_at_step_3  # type: ignore[method-assign]
        trained = laptop.train(config("scaled_down", steps=400, every=100_000))
        shown = laptop.out.getvalue()
        assert "the worker running it shut down (send the same train_with_yaml again: it resumes from step" in shown
        assert "; sending it again" in shown
        assert first.process.returncode is not None and endpoint.queue.taken_by[events[0].id] == 1
        assert trained["steps"] == 400 and 3 <= trained["resumed_from_step"] < 400
        assert "training stopped by the worker shutting down" in first.log.read_text()
