"""Hub downloads through a loopback stand-in for the hub (``tests.fake_hub``): the worker's real
download code (``hub_fetch``: a child process running huggingface_hub, watched by the worker),
with ``HF_ENDPOINT`` pointed at loopback and no name looked up.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import handler_fast
from fastbackend.errors import FastBackendError
from tests.fake_hub import COMMIT, serving
from tests.test_stop_phases import BOUND_S, assert_stopped, listed_models, stopped_during
from tests.training_helpers import train, upload_photos, user_yaml

REPO_ID = "tiny-org/tiny-flux"


@pytest.fixture
def hub(tiny_models, monkeypatch):
    """Serves the tiny FLUX as a hub repository (``hub(**FakeHub options)``), the stall bound short."""
    monkeypatch.setenv("FASTBACKEND_DOWNLOAD_STALL_S", "1.5")
    with contextlib.ExitStack() as servers:
        yield lambda **options: servers.enter_context(serving(monkeypatch, REPO_ID, tiny_models / "flux", **options))


def blobs(data_root, cache: str = "huggingface-cache/hub"):
    return data_root / cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs"


def children_running() -> list[str]:
    found = subprocess.run(["pgrep", "-af", "fastbackend.hub_fetch"], capture_output=True, text=True, check=False)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_a_first_run_downloads_the_model_into_runpods_cache_reports_its_bytes_and_trains(hub, data_root, monkeypatch):
    from fastbackend import hub_fetch
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest

    monkeypatch.setattr(hub_fetch, "REPORT_S", 0.0)
    monkeypatch.setenv("FASTBACKEND_DOWNLOAD_STALL_S", "30")  # slow, never stalled
    fake = hub(byte_delay_s=0.05)
    upload_photos()
    seen: list[dict] = []
    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config=user_yaml(REPO_ID, steps=2))
    answer = train_with_yaml(request, progress=seen.append)
    assert answer["status"] == "success", answer
    snapshot = data_root / "huggingface-cache" / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snapshot / "model_index.json").is_file()
    downloads = [info for info in seen if "downloaded_bytes" in info]
    sizes = [info["downloaded_bytes"] for info in downloads]
    whole = sum(len(data) for data in fake.files.values())
    assert {info["stage"] for info in downloads} == {"loading_model"} and len(sizes) >= 2
    assert sizes[-1] <= whole and max(info["total_bytes"] or 0 for info in downloads) == whole
    assert not [p for p in blobs(data_root).iterdir() if p.name.endswith(".incomplete")]


def test_a_read_only_cache_mount_is_never_written_downloads_go_to_the_workers_own(hub, data_root, monkeypatch):
    from fastbackend import storage
    from fastbackend.hub_fetch import fetch

    runpods = data_root / "huggingface-cache" / "hub"
    runpods.mkdir(parents=True)
    monkeypatch.setattr(storage, "writable", lambda folder: folder != runpods)  # RunPod's managed mount, read-only
    hub()
    folder = fetch(REPO_ID, None, storage.DIFFUSERS_FILES, storage.download_cache_dir(), "model")
    assert folder.is_relative_to(data_root / "fastbackend-hub-cache") and list(runpods.iterdir()) == []
    assert storage.cached_snapshot(REPO_ID, None) == folder


def test_a_download_that_stalls_mid_file_is_tried_again_with_xet_off_and_completes(hub, data_root, monkeypatch):
    from fastbackend import hub_fetch, storage

    environments: list[dict] = []
    real_popen = subprocess.Popen

    def recording_popen(command, **options):
        environments.append(options["env"])
        return real_popen(command, **options)

    monkeypatch.setattr(hub_fetch.subprocess, "Popen", recording_popen)
    fake = hub(stall_first=1)
    started = time.monotonic()
    folder = hub_fetch.fetch(REPO_ID, None, storage.DIFFUSERS_FILES, storage.download_cache_dir(), "model")
    assert storage.pipeline_complete(folder) and fake.stalled == 1
    assert [env.get("HF_HUB_DISABLE_XET") for env in environments] == [None, "1"]
    assert time.monotonic() - started < 30
    assert not [p for p in blobs(data_root).iterdir() if p.name.endswith(".incomplete")]


def test_a_download_that_keeps_stalling_fails_clearly_and_the_worker_answers_the_next_job(hub, data_root):
    from fastbackend import hub_fetch

    hub(stall_first=hub_fetch.TRIES)
    upload_photos()
    answer = train(user_yaml(REPO_ID))
    assert answer["error_code"] == "model_load_failed", answer
    assert answer["error"].startswith(
        f"config.process[0].model.name_or_path: could not load '{REPO_ID}': its download stalled 3 times "
        "(no byte for 1.5 s; the last 2 tries with Xet off)"
    )
    assert not [p for p in blobs(data_root).iterdir() if p.name.endswith(".incomplete")]
    assert children_running() == [] and listed_models() == []
    assert handler_fast.handler({"id": "h", "input": {"type": "health"}})["status"] == "healthy"


def test_a_stop_mid_download_ends_the_child_and_keeps_no_partial_file(hub, data_root, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_DOWNLOAD_STALL_S", "60")  # slow, never stalled
    fake = hub(byte_delay_s=0.5)  # 64 KiB every half second: a slow link
    upload_photos()
    started = threading.Event()

    def when_the_largest_file_flows() -> None:
        while not any(method == "GET" and path.endswith(fake.largest) for method, path, _ in fake.requests):
            time.sleep(0.05)
        time.sleep(0.6)  # a chunk or two on the way
        started.set()

    threading.Thread(target=when_the_largest_file_flows, daemon=True).start()
    answer, seconds = stopped_during({"type": "train_with_yaml", "yaml_config": user_yaml(REPO_ID)}, started)
    assert_stopped(answer, seconds, "the model's download")
    assert seconds < BOUND_S and children_running() == [] and listed_models() == []
    assert not [p for p in blobs(data_root).iterdir() if p.name.endswith(".incomplete")]


def test_the_revision_and_token_reach_the_hub_and_the_token_no_command_line(hub, data_root, monkeypatch):
    from fastbackend import hub_fetch

    commands: list[list[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(command, **options):
        commands.append(command)
        return real_popen(command, **options)

    monkeypatch.setattr(hub_fetch.subprocess, "Popen", recording_popen)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    fake = hub()
    upload_photos()
    text = user_yaml(REPO_ID).replace("is_flux: true", "is_flux: true\n      revision: abc123")
    answer = train(text)
    assert answer["error_code"] == "model_load_failed", answer  # the stand-in knows no revision but main
    assert "hf_secret_token" not in str(answer)
    assert ("GET", f"/api/models/{REPO_ID}/revision/abc123", None) in fake.requests
    assert fake.authorizations and set(fake.authorizations) == {"Bearer hf_secret_token"}
    assert commands and all("hf_secret_token" not in " ".join(command) for command in commands)


def test_a_repository_the_hub_does_not_have_is_named(hub, data_root):
    hub()
    upload_photos()
    answer = train(user_yaml("tiny-org/no-such-model"))
    assert answer["error_code"] == "model_load_failed", answer
    assert answer["error"].startswith("config.process[0].model.name_or_path: could not load 'tiny-org/no-such-model' (")


def test_offline_a_model_in_no_cache_is_refused_without_starting_a_download(data_root, monkeypatch):
    from fastbackend import hub_fetch

    monkeypatch.setattr(hub_fetch.subprocess, "Popen", lambda *a, **k: pytest.fail("a download was started"))
    upload_photos()
    answer = train(user_yaml(REPO_ID))
    assert answer["error"] == (
        f"config.process[0].model.name_or_path: could not load '{REPO_ID}': it is in no hub cache on this worker, "
        "and HF_HUB_OFFLINE is set"
    )


def test_the_child_finds_the_package_from_any_working_folder(hub, data_root, tmp_path, monkeypatch):
    """The image runs the worker from its own folder without installing the package: the child is
    told where the package is (the test's own install would find it anyway, so the path is checked)."""
    from fastbackend import hub_fetch, storage

    environments: list[dict] = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(
        hub_fetch.subprocess, "Popen", lambda c, **o: environments.append(o["env"]) or real_popen(c, **o)
    )
    hub()
    monkeypatch.chdir(tmp_path)
    folder = hub_fetch.fetch(REPO_ID, None, ["model_index.json"], storage.download_cache_dir(), "model")
    assert (folder / "model_index.json").is_file()
    first = environments[0]["PYTHONPATH"].split(":")[0]
    assert (Path(first) / "fastbackend" / "hub_fetch.py").is_file()


def test_copies_no_load_reads_are_not_downloaded(tiny_models, data_root, monkeypatch, tmp_path):
    """Other frameworks' weights and other variants stay on the hub; the copy is still found complete."""
    from fastbackend import hub_fetch, storage

    repository = tmp_path / "repository"
    shutil.copytree(tiny_models / "flux", repository)
    (repository / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(bytes(1000))
    (repository / "vae" / "flax_model.msgpack").write_bytes(bytes(1000))
    with serving(monkeypatch, REPO_ID, repository) as fake:
        folder = hub_fetch.fetch(REPO_ID, None, storage.DIFFUSERS_FILES, storage.download_cache_dir(), "model")
    fetched = {path for method, path, _ in fake.requests if method == "GET" and "/resolve/" in path}
    assert not any(path.endswith((".fp16.safetensors", ".msgpack")) for path in fetched) and fetched
    assert storage.cached_snapshot(REPO_ID, None) == folder


def test_a_repository_without_the_files_asked_for_is_model_load_failed(hub, data_root):
    from fastbackend import hub_fetch, storage

    hub()
    with pytest.raises(FastBackendError) as failed:
        hub_fetch.fetch(REPO_ID, None, ["nothing/*.safetensors"], storage.download_cache_dir(), "field")
    assert failed.value.code == "model_load_failed"
    assert failed.value.message.startswith(f"field: could not load '{REPO_ID}': the repository has none of the files")


def test_a_captioner_named_by_hub_id_is_downloaded_through_the_same_road_and_captions(
    tiny_captioner, data_root, monkeypatch
):
    from fastbackend.storage import cached_hub_file, hf_cache_dir
    from fastbackend.training import pipeline_cache
    from tests.photos import b64, nine_photos

    pipeline_cache.release()
    monkeypatch.setenv("FASTBACKEND_CAPTION_MODEL", "tiny-org/florence")
    files = [{"filename": name, "content": b64(data)} for name, data, _ in nine_photos()[:2]]
    upload = {"type": "upload_training_data", "training_name": "matt", "files": files, "auto_caption": True}
    with serving(monkeypatch, "tiny-org/florence", tiny_captioner) as fake:
        answer = handler_fast.handler({"id": "u", "input": upload})
    assert answer["status"] == "success", answer
    assert len(answer["auto_captions"]["captions"]) == 2, answer
    assert cached_hub_file("tiny-org/florence", "model.safetensors")[0] == hf_cache_dir()
    assert any(path.endswith("model.safetensors") for method, path, _ in fake.requests if method == "GET")


def test_a_captioner_cut_short_is_downloaded_again_not_loaded_broken(tiny_captioner, data_root, monkeypatch):
    from fastbackend import hub_fetch, storage
    from fastbackend.captions import captioner_folder

    with serving(monkeypatch, "tiny-org/florence", tiny_captioner):
        hub_fetch.fetch("tiny-org/florence", None, ["config.json"], storage.download_cache_dir(), "field")  # cut short
        folder = Path(captioner_folder("tiny-org/florence", "field"))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
