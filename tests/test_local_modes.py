"""End to end through runpod's own local modes: ``--test_input`` and ``--rp_serve_api``."""

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent


def run_worker(entry: str, *args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / entry), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_test_input_health_exits_zero():
    result = run_worker("handler_fast.py", "--test_input", '{"input": {"type": "health"}}')
    assert result.returncode == 0, result.stdout + result.stderr
    assert "'status': 'healthy'" in result.stdout


def test_job_bodies_are_not_logged():
    secret = "U0VDUkVU" * 20
    result = run_worker("handler_fast.py", "--test_input", json.dumps({"input": {"type": "health", "deep": secret}}))
    assert result.returncode == 1
    assert secret not in result.stdout + result.stderr
    assert "<string of 160 characters>" in result.stdout


def test_no_base64_reaches_the_log_when_test_input_prints_the_answer(data_root):
    """runpod's --test_input prints "Job result: {...}" at INFO: a LoRA chunk must not be in it."""
    lora = data_root / "output" / "matt" / "matt.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(os.urandom(3000))
    job = json.dumps({"input": {"type": "download_model", "model": "matt"}})
    result = run_worker("handler_fast.py", "--test_input", job)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Job result:" in result.stdout and "<4000 base64 characters>" in result.stdout
    assert not re.search(r"[A-Za-z0-9+/]{120,}", result.stdout + result.stderr)


def test_long_base64_is_shortened_in_the_workers_own_log_lines():
    import logging

    from fastbackend import logs

    chunk = base64.b64encode(os.urandom(150)).decode()
    record = logging.LogRecord("fastbackend.x", logging.INFO, __file__, 1, "answer %s", (chunk,), None)
    assert logs.ShortenBase64().filter(record) and record.getMessage() == "answer <200 base64 characters>"
    kept = f"sha256 {'ab' * 32} /runpod-volume/training_data/matt entry {'photos/' * 30}a.jpg"
    assert logs.shorten_base64(kept) == kept  # hashes, paths and long names made of words stay
    wrapped = base64.encodebytes(os.urandom(300)).decode()  # 76 columns, as the base64 tool writes
    shown = len(repr(wrapped)) - 2  # the line breaks as a logged dict escapes them
    assert logs.shorten_base64(repr({"content": wrapped})) == f"{{'content': '<{shown} base64 characters>'}}"
    url_safe = base64.urlsafe_b64encode(os.urandom(300)).decode()
    assert logs.shorten_base64(url_safe) == "<400 base64 characters>"
    bad_args = logging.LogRecord("fastbackend.x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    assert logs.ShortenBase64().filter(bad_args)  # logging reports the bad call itself, as without the filter


def test_test_input_unknown_type_exits_one_and_lists_types():
    result = run_worker("handler_fast.py", "--test_input", '{"input": {"type": "bogus"}}')
    assert result.returncode == 1
    assert "valid types: health, list_models" in result.stdout


def test_no_flags_reads_test_input_json_through_the_alias_entry_point():
    assert json.loads((REPO / "test_input.json").read_text())["input"]["type"] == "health"
    result = run_worker("handler.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Using test_input.json" in result.stdout and "'status': 'healthy'" in result.stdout


def test_light_requests_never_import_torch(data_root):
    script = (
        "import sys; from handler_fast import handler\n"
        "for kind in ('health', 'list_models'):\n"
        "    assert handler({'id': '1', 'input': {'type': kind}})['status'] in ('healthy', 'success')\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_volume(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-volume")


@pytest.fixture(scope="module")
def local_server(server_volume):
    port = free_port()
    env = dict(os.environ, FASTBACKEND_DATA_DIR=str(server_volume))
    process = subprocess.Popen(
        [sys.executable, "handler_fast.py", "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                requests.get(f"{url}/docs", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail("the local server did not start in 30 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_setting_that_does_not_parse_stops_the_worker_before_any_job(tmp_path):
    env = dict(os.environ, FASTBACKEND_DATA_DIR=str(tmp_path), FASTBACKEND_MAX_IMAGE_PIXELS="fifty million")
    result = subprocess.run(
        [sys.executable, str(REPO / "handler_fast.py"), "--test_input", '{"input": {"type": "health"}}'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "environment variable FASTBACKEND_MAX_IMAGE_PIXELS='fifty million' is not valid" in result.stderr
    assert '"status": "healthy"' not in result.stdout


def test_the_payload_limit_follows_the_environment_of_the_process(tmp_path):
    job = '{"input": {"type": "health", "pad": "' + "x" * 600 + '"}}'
    env = dict(os.environ, FASTBACKEND_DATA_DIR=str(tmp_path), FASTBACKEND_RUN_LIMIT_BYTES="500")
    result = subprocess.run(
        [sys.executable, str(REPO / "handler_fast.py"), "--test_input", job],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "payload: 636 bytes is over the 500-byte limit for this route" in result.stdout + result.stderr


def test_server_runsync_health_completes(local_server):
    answer = requests.post(f"{local_server}/runsync", json={"input": {"type": "health"}}, timeout=60).json()
    assert answer["status"] == "COMPLETED"
    assert answer["output"]["status"] == "healthy"


def test_the_clients_webhook_receives_the_result_through_the_local_server(local_server):
    import http.server
    import threading

    from fastbackend.client import Client

    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        client = Client(local_server, webhook=f"http://127.0.0.1:{hook.server_address[1]}/done")
        assert client.call({"type": "health"})["status"] == "healthy"  # no webhook: not asked to notify
        assert client.run({"type": "health"})["status"] == "healthy"  # a training-like request notifies
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        hook.shutdown()
    time.sleep(0.5)
    assert len(received) == 1 and received[0]["output"]["status"] == "healthy"


def test_server_runsync_bad_request_fails_with_the_error_string(local_server):
    answer = requests.post(f"{local_server}/runsync", json={"input": {"type": "health", "x": 1}}, timeout=60).json()
    assert answer["status"] == "FAILED"
    assert answer["error"] == "input.x: unknown key; valid keys: type, deep"


def test_server_uploads_trains_lists_and_downloads(local_server, server_volume, tiny_models, tmp_path, monkeypatch):
    """The user's whole flow through RunPod's own local server, with the package's client."""
    import shutil

    from fastbackend import client as client_module
    from tests.photos import nine_photos
    from tests.training_helpers import user_yaml

    shutil.copytree(tiny_models / "sdxl", server_volume / "models" / "sdxl")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, data, caption in nine_photos()[:4]:
        (photos / name).write_bytes(data)
        (photos / name).with_suffix(".txt").write_text(caption)
    monkeypatch.setattr(client_module, "BATCH_BYTES", 1_500_000)  # small batches: several requests
    client = client_module.Client(local_server)

    uploaded = client.upload_folder("matt_training_test", photos)
    assert uploaded["requests"] > 1 and uploaded["total_images"] == 4 and len(uploaded["uploaded_files"]) == 4
    trained = client.call(
        {"type": "train_with_yaml", "yaml_config": user_yaml("/workspace/models/sdxl", "sdxl", steps=2)}
    )
    assert trained["steps"] == 2
    listed = client.call({"type": "list_models"})
    # The server's volume is shared by this module's tests: look at this run's model only.
    assert [m["filename"] for m in listed["models"] if m["name"] == trained["model"]] == [
        "nowy_dataset_1.3.safetensors"
    ]
    downloaded = client.download("nowy_dataset_1.3", tmp_path)
    assert downloaded.read_bytes() == Path(trained["lora_path"]).read_bytes()
    with pytest.raises(client_module.WorkerError, match=r"input\.model: model 'nope' does not exist"):
        client.call({"type": "delete_model", "model": "nope"})
