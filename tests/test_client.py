"""The client splits uploads under the request limit and refuses what cannot fit."""

import base64
import hashlib
import http.server
import io
import json
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbackend import client


def test_batches_stay_under_the_limit_and_carry_captions(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BATCH_BYTES", 3000)
    for index in range(5):
        (tmp_path / f"img{index}.jpg").write_bytes(bytes(1000))
    (tmp_path / "img0.txt").write_text("Matt, photo\n")
    (tmp_path / "notes.md").write_text("not an image")
    groups = client.batches(tmp_path)
    assert [len(group) for group in groups] == [2, 2, 1]
    assert all(sum(len(json.dumps(entry)) for entry in group) <= 3000 for group in groups)
    assert groups[0][0]["caption"] == "Matt, photo" and "caption" not in groups[0][1]


def test_a_file_too_large_for_any_request_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BATCH_BYTES", 1000)
    (tmp_path / "huge.jpg").write_bytes(bytes(2000))
    with pytest.raises(
        client.WorkerError, match=r"huge\.jpg is too large for one request; upload it with `urls` instead"
    ):
        client.batches(tmp_path)


def test_auto_caption_goes_with_every_request_and_the_captions_come_back_together(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BATCH_BYTES", 3000)
    for index in range(3):
        (tmp_path / f"img{index}.jpg").write_bytes(bytes(1000))
    sent = []

    def call(self, payload):
        sent.append(payload)
        names = [entry["filename"] for entry in payload["files"]]
        made = {"model": "m", "class_word": "man", "captions": {name: f"[trigger] man {name}" for name in names}}
        return {"uploaded_files": names, "skipped": [], "auto_captions": made}

    monkeypatch.setattr(client.Client, "call", call)
    result = client.Client("http://localhost:8000").upload_folder("matt", tmp_path, auto_caption=True)
    assert len(sent) == 2 and sent[0]["auto_caption"] is True
    assert sent[1]["auto_caption"] == {"class_word": "man"}  # the first request's, for the whole dataset
    assert result["auto_captions"]["captions"] == {f"img{i}.jpg": f"[trigger] man img{i}.jpg" for i in range(3)}


def test_caption_asks_the_worker_to_caption_a_dataset_already_there(monkeypatch, capsys):
    sent = []
    monkeypatch.setattr(client.Client, "call", lambda self, payload: sent.append(payload) or {"ok": 1})
    client.main(["--url", "http://localhost:8000", "caption", "matt", "--again"])
    assert sent == [{"type": "caption_dataset", "training_name": "matt", "replace_automatic": True}]
    assert json.loads(capsys.readouterr().out) == {"ok": 1}
    client.main(["--url", "http://localhost:8000", "caption", "matt", "--class-word", "woman"])
    assert sent[1] == {
        "type": "caption_dataset",
        "training_name": "matt",
        "replace_automatic": False,
        "auto_caption": {"class_word": "woman"},
    }


# ---------------------------------------------------------------- following jobs


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
PROGRESS_KEYS = st.sampled_from(["stage", "step", "total_steps", "loss", "eta_s", "downloaded_bytes", "model", "x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(JSON | st.dictionaries(PROGRESS_KEYS, JSON, max_size=6), max_size=6))
def test_no_progress_shape_can_crash_the_view(updates):
    out = io.StringIO()
    view = client.ProgressView(out)
    for update in updates:
        view.update(update)
    view.finish()


def test_the_view_shows_steps_as_a_bar_and_stages_by_name():
    out = io.StringIO()
    view = client.ProgressView(out)
    view.update({"stage": "loading_model", "model": "black-forest-labs/FLUX.1-dev", "downloaded_bytes": 3_500_000_000})
    view.update({"stage": "sampling", "step": 100})  # a stage with a step and no total_steps (the old crash)
    view.update({"stage": "training", "step": 120, "total_steps": 2000, "loss": 0.25, "eta_s": 600})
    view.update({"stage": "saving", "step": 200})
    view.update({"stage": "training", "step": 250, "total_steps": 2000, "loss": 0.2})
    view.finish()
    text = out.getvalue()
    assert "loading_model (3.50 GB downloaded, model black-forest-labs/FLUX.1-dev)" in text
    assert "sampling (step 100)" in text and "saving (step 200)" in text
    assert "2000/2000" in text and "loss=0.2000" in text


@pytest.mark.parametrize(
    ("view", "message"),
    [
        ({"id": "j", "status": "CANCELLED"}, r"job j was cancelled\. The worker keeps the newest step save"),
        ({"id": "j", "status": "TIMED_OUT"}, r"execution timeout \(--max-hours .*send the same `train` command again"),
        (
            {"id": "j", "status": "FAILED", "error": "input.model: nope\nmore", "output": {"error_code": "not_found"}},
            r"^not_found: input\.model: nope$",
        ),
        ({"id": "j", "status": "FAILED"}, r"^job ended FAILED$"),
        ({"id": "j", "status": "COMPLETED", "output": "not a dict"}, r"job ended COMPLETED"),
    ],
)
def test_every_end_but_success_is_one_line_that_says_why(view, message):
    with pytest.raises(client.WorkerError, match=message):
        client.output_of(view)


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of the server's script."""

    def do_GET(self):
        self._next()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._next()

    def _next(self):
        self.server.seen.append(self.path)
        code, body = self.server.script.pop(0) if self.server.script else (200, {})
        if code == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.script, server.seen = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def quick_client(url: str, **kwargs) -> client.Client:
    return client.Client(url, "key", out=io.StringIO(), poll_s=0.01, backoff_s=0.01, **kwargs)


def test_429_and_5xx_are_retried_then_a_runsync_that_is_not_final_is_followed(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}/v2/e"
    scripted.script = [
        (429, {}),
        (503, {}),
        (200, {"id": "sync-1", "status": "IN_PROGRESS"}),  # RunPod's answer after its 90 s hold
        (502, {}),
        (200, {"id": "sync-1", "status": "IN_PROGRESS", "output": {"stage": "x"}}),
        (200, {"id": "sync-1", "status": "COMPLETED", "output": {"models": []}}),
    ]
    assert quick_client(url).call({"type": "list_models"}) == {"models": []}
    assert scripted.seen == ["/v2/e/runsync"] * 3 + ["/v2/e/status/sync-1"] * 3


def test_retries_are_bounded_and_say_what_failed(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}/v2/e"
    scripted.script = [(500, {})] * 10
    with pytest.raises(client.WorkerError, match=r"answered 500, 3 tries$"):
        quick_client(url, retries=2).status("j")
    assert len(scripted.seen) == 3


def test_a_job_whose_sending_broke_midway_is_not_sent_twice(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}/v2/e"
    scripted.script = [("drop", None)]
    with pytest.raises(client.WorkerError, match="the connection broke while sending the job"):
        quick_client(url).submit({"type": "train_with_yaml"}, "run")
    assert scripted.seen == ["/v2/e/run"]  # it may have been queued: sending it again could train twice


def test_an_endpoint_that_cannot_be_reached_is_one_line_after_bounded_tries():
    with socket.socket() as taken:  # a port nobody listens on
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    with pytest.raises(client.WorkerError, match=rf"cannot reach http://127.0.0.1:{port}/v2/e .*, 3 tries$"):
        quick_client(f"http://127.0.0.1:{port}/v2/e", retries=2).call({"type": "list_models"})


def test_a_wrong_key_and_an_unknown_job_are_one_line_each(tmp_path, capsys):
    from devtools.endpoint import Endpoint

    with Endpoint(tmp_path / "logs", api_key="right") as endpoint:
        for argv, message in (
            (["--api-key", "wrong", "list"], "error: 401 Unauthorized: the API key is missing or wrong"),
            (["--api-key", "right", "status", "no-such-job"], "error: job 'no-such-job': no such job on this endpoint"),
            (["--api-key", "right", "cancel", "no-such-job"], "error: job 'no-such-job': no such job on this endpoint"),
        ):
            with pytest.raises(SystemExit) as exited:
                client.main(["--url", endpoint.url, *argv])
            assert str(exited.value).startswith(message) and "\n" not in str(exited.value)


def test_ctrl_c_cancels_the_job_and_waits_for_runpod_to_stop_it(tmp_path, monkeypatch):
    from devtools.endpoint import Endpoint
    from tests.test_endpoint import FakeWorker

    with Endpoint(tmp_path / "logs", api_key="key") as endpoint:
        user = quick_client(endpoint.url)
        polls = []

        def status_then_ctrl_c(job_id):
            polls.append(job_id)
            if len(polls) == 2:
                raise KeyboardInterrupt
            return client.Client.status(user, job_id)

        worker = FakeWorker(endpoint)
        threading.Timer(0.05, worker.take).start()
        monkeypatch.setattr(user, "status", status_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            user.run({"type": "train_with_yaml"})
        job_id = polls[0]
        assert worker.stops() == [job_id]  # the worker is told to stop
        printed = user.out.getvalue()
        assert f"job {job_id} sent; follow it: python -m fastbackend.client --url {endpoint.url}" in printed
        assert (
            f"cancel {job_id}" in printed
            and f"job {job_id}: CANCELLED. The worker keeps the newest step save" in printed
        )
        assert "key" not in printed.replace("--api-key $RUNPOD_API_KEY", "")  # the key itself is never printed


def test_training_sends_an_execution_timeout_and_a_ttl(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}/v2/e"
    bodies = []
    real = client.Client._request

    def record(self, method, path, body=None, submit=False):
        bodies.append(body)
        return real(self, method, path, body, submit)

    scripted.script = [
        (200, {"id": "j", "status": "IN_QUEUE"}),
        (200, {"id": "j", "status": "COMPLETED", "output": {}}),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client.Client, "_request", record)
        quick_client(url, max_hours=2.5).run({"type": "train_with_yaml"})
    assert bodies[0]["policy"] == {"executionTimeout": 9_000_000, "ttl": 9_000_000 + 86_400_000}


# ---------------------------------------------------------------- downloads


class ChunkServer:
    """``download_model`` answers over a file's bytes; raises the client's error at chunk ``cut_at``."""

    def __init__(self, data: bytes, cut_at: int | None = None):
        self.data, self.cut_at, self.offsets = data, cut_at, []

    def __call__(self, payload: dict) -> dict:
        offset, length = payload.get("offset", 0), payload.get("length", 4)
        self.offsets.append(offset)
        if self.cut_at is not None and len(self.offsets) == self.cut_at:
            raise client.WorkerError("cannot reach the endpoint (ConnectionError), 6 tries")
        end = min(offset + length, len(self.data))
        return {
            "filename": "lora.safetensors",
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "total_size": len(self.data),
            "content": base64.b64encode(self.data[offset:end]).decode(),
            "next_offset": end if end < len(self.data) else None,
        }


def test_a_cut_download_leaves_only_a_part_file_and_the_next_one_resumes_it(tmp_path, monkeypatch):
    data = bytes(range(256)) * 3
    server = ChunkServer(data, cut_at=4)  # the probe, two chunks, then the network drops
    user = quick_client("http://127.0.0.1:1/v2/e")
    monkeypatch.setattr(user, "call", server)
    with pytest.raises(client.WorkerError):
        user.download("m", tmp_path, chunk_bytes=100)
    assert not (tmp_path / "lora.safetensors").exists()
    (part,) = tmp_path.glob("lora.safetensors.*.part")
    assert part.stat().st_size == 200
    server.cut_at, server.offsets = None, []
    assert user.download("m", tmp_path, chunk_bytes=100) == tmp_path / "lora.safetensors"
    assert server.offsets[1] == 200  # after the probe, from where the cut left it
    assert (tmp_path / "lora.safetensors").read_bytes() == data and not part.exists()


def test_a_download_whose_bytes_do_not_match_leaves_nothing(tmp_path, monkeypatch):
    server = ChunkServer(b"x" * 300)
    user = quick_client("http://127.0.0.1:1/v2/e")
    monkeypatch.setattr(user, "call", server)
    part = tmp_path / f"lora.safetensors.{hashlib.sha256(b'x' * 300).hexdigest()[:16]}.part"
    part.write_bytes(b"y" * 100)  # a part file someone damaged
    with pytest.raises(client.WorkerError, match="sha256 mismatch after download; removed"):
        user.download("m", tmp_path, chunk_bytes=100)
    assert list(tmp_path.iterdir()) == []


def test_photos_are_fingerprinted_as_the_worker_fingerprints_a_dataset(tmp_path):
    from fastbackend.layout import DatasetFolder
    from handler_fast import handler
    from tests.photos import nine_photos

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data, caption in nine_photos()[:4]:
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    (folder / nine_photos()[4][0]).write_bytes(nine_photos()[4][1])  # one without a caption
    files = client.photo_entries(folder)
    answer = handler({"id": "up", "input": {"type": "upload_training_data", "training_name": "matt", "files": files}})
    assert answer["status"] == "success", answer
    from fastbackend.storage import dataset_dir

    assert DatasetFolder(dataset_dir("matt")).content_sha256() == client.folder_sha256(folder)
    (folder / "IMG_0000.txt").write_text("another caption")
    assert DatasetFolder(dataset_dir("matt")).content_sha256() != client.folder_sha256(folder)


class ScriptedTrainings:
    """``Client.run`` answering from a script (a WorkerError is raised), recording what was sent."""

    def __init__(self, *answers):
        self.answers, self.sent, self.uploads = list(answers), [], []

    def install(self, monkeypatch):
        monkeypatch.setattr(client.Client, "run", lambda _, payload, notify=True: self._run(payload))
        monkeypatch.setattr(client.Client, "upload_folder", lambda _, name, folder, mode: self.uploads.append(mode))

    def _run(self, payload):
        self.sent.append(payload)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def three_photos(folder):
    for index in range(3):
        (folder / f"img{index}.jpg").write_bytes(bytes([index]) * 1000)
    return folder


MISMATCH = client.WorkerError("dataset_mismatch: input.datasets.matt_training_test: ... does not exist")


def test_train_photos_name_their_fingerprint_and_travel_only_where_missing(tmp_path, monkeypatch):
    from tests.training_helpers import fixture_yaml

    photos, user = three_photos(tmp_path), client.Client("http://127.0.0.1:1/v2/e", out=io.StringIO())
    sha256 = {"sha256": client.folder_sha256(photos)}
    already_there = ScriptedTrainings({"ok": 1})
    already_there.install(monkeypatch)
    assert user.train(fixture_yaml(), photos) == {"ok": 1}
    assert already_there.sent[0]["datasets"] == {"matt_training_test": sha256} and already_there.uploads == []

    missing = ScriptedTrainings(MISMATCH, {"ok": 2})  # small: the photos go inside the second request
    missing.install(monkeypatch)
    assert user.train(fixture_yaml(), photos) == {"ok": 2}
    dataset = missing.sent[1]["datasets"]["matt_training_test"]
    assert dataset["sha256"] == sha256["sha256"] and [f["filename"] for f in dataset["files"]] == [
        "img0.jpg",
        "img1.jpg",
        "img2.jpg",
    ]
    assert missing.uploads == []


def test_train_photos_too_large_for_one_request_are_uploaded_first_and_a_second_volume_is_named(tmp_path, monkeypatch):
    from tests.training_helpers import fixture_yaml

    photos, user = three_photos(tmp_path), client.Client("http://127.0.0.1:1/v2/e", out=io.StringIO())
    monkeypatch.setattr(client, "BATCH_BYTES", 2000)
    lands = ScriptedTrainings(MISMATCH, {"ok": 1})
    lands.install(monkeypatch)
    assert user.train(fixture_yaml(), photos) == {"ok": 1}
    assert lands.uploads == ["replace"] and all("files" not in p["datasets"]["matt_training_test"] for p in lands.sent)
    elsewhere = ScriptedTrainings(MISMATCH, MISMATCH)
    elsewhere.install(monkeypatch)
    with pytest.raises(client.WorkerError, match=r"need several requests, .* keep the endpoint to one volume$"):
        user.train(fixture_yaml(), photos)


def upload_and_fingerprint(folder) -> tuple[str, str]:
    """The client's fingerprint of ``folder``, and the worker's of the dataset the client's upload made."""
    from fastbackend.layout import DatasetFolder
    from fastbackend.storage import dataset_dir
    from handler_fast import handler

    job = {"type": "upload_training_data", "training_name": "matt", "files": client.photo_entries(folder)}
    answer = handler({"id": "up", "input": job})
    assert answer["status"] == "success", answer
    return client.folder_sha256(folder), DatasetFolder(dataset_dir("matt")).content_sha256()


FOLDERS = {
    "distinct photos, some captioned": {"a.jpg": (0, "Matt, photo"), "b.jpg": (1, None), "c.png": (2, "Matt")},
    "equal photos, other captions": {"a.jpg": (0, "first"), "b.jpg": (0, "second")},
    "equal photos, only the second captioned": {"a.jpg": (0, None), "b.jpg": (0, "a caption")},
    "a caption asking for an automatic one": {"a.jpg": (0, None), "b.jpg": (1, "Matt")},
    "upper-case names and a BOM": {"A.JPG": (0, "\ufeffMatt, photo"), "b.jpg": (1, None)},
}


@pytest.mark.parametrize("layout", list(FOLDERS), ids=list(FOLDERS))
def test_photos_are_fingerprinted_as_the_worker_fingerprints_what_their_upload_made(layout, tmp_path, data_root):
    from tests.photos import photo

    for name, (seed, caption) in FOLDERS[layout].items():
        (tmp_path / name).write_bytes(photo(320, 300, "PNG" if name.endswith("png") else "JPEG", seed=seed))
        if caption is not None:
            (tmp_path / name).with_suffix(".TXT" if name.isupper() else ".txt").write_text(caption, encoding="utf-8")
    (tmp_path / "._a.jpg").write_bytes(b"macOS resource fork")  # skipped, as the worker would
    client_side, worker_side = upload_and_fingerprint(tmp_path)
    assert client_side == worker_side


def test_photos_sharing_a_caption_file_or_with_a_caption_that_is_not_utf8_are_named(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "a.txt").write_bytes("Mateusz, zdjęcie".encode("cp1250"))
    with pytest.raises(client.WorkerError, match=r"a\.txt: not UTF-8 text"):
        client.folder_sha256(tmp_path)
    (tmp_path / "a.txt").write_text("ok")
    (tmp_path / "a.png").write_bytes(b"2")
    with pytest.raises(client.WorkerError, match=r"^a\.jpg and a\.png share one caption file"):
        client.photo_paths(tmp_path)


def test_download_into_a_folder_named_with_a_slash_and_chunks_that_do_not_follow_on(tmp_path, monkeypatch):
    server = ChunkServer(b"z" * 250)
    user = quick_client("http://127.0.0.1:1/v2/e")
    monkeypatch.setattr(user, "call", server)
    target = user.download("m", f"{tmp_path}/loras/", chunk_bytes=100)
    assert target == tmp_path / "loras" / "lora.safetensors" and target.read_bytes() == b"z" * 250

    def stuck(payload):
        answer = server(payload)
        return answer if payload.get("length") == 1 else answer | {"next_offset": payload.get("offset", 0)}

    monkeypatch.setattr(user, "call", stuck)
    with pytest.raises(client.WorkerError, match="does not follow on"):
        user.download("m", tmp_path / "again.safetensors", chunk_bytes=100)


def test_ctrl_c_while_only_watching_a_job_does_not_cancel_it(monkeypatch):
    user = quick_client("http://127.0.0.1:1/v2/e")
    cancelled = []
    monkeypatch.setattr(user, "cancel", cancelled.append)
    monkeypatch.setattr(user, "status", lambda job_id: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        user.follow({"id": "j", "status": "IN_PROGRESS"}, cancel_on_interrupt=False)
    assert cancelled == [] and "stopped watching; the job goes on. Cancel it:" in user.out.getvalue()


@pytest.mark.parametrize("hours", ["0", "-1", "200", "soon"])
def test_max_hours_outside_runpods_bounds_is_refused(hours, capsys):
    with pytest.raises(SystemExit):
        client.main(["--url", "http://127.0.0.1:1/v2/e", "train", "x.yaml", "--max-hours", hours])
    assert "--max-hours" in capsys.readouterr().err


def test_a_short_request_refused_by_a_worker_shutting_down_is_sent_again(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}/v2/e"
    shut = {"error_code": "stopped", "stopped_by": "shutdown", "resend": "send it again"}
    scripted.script = [
        (200, {"id": "sync-1", "status": "FAILED", "error": "the worker is shutting down", "output": shut}),
        (200, {"id": "sync-2", "status": "COMPLETED", "output": {"models": []}}),
    ]
    user = quick_client(url)
    assert user.call({"type": "list_models"}) == {"models": []}
    assert scripted.seen == ["/v2/e/runsync"] * 2
    assert "job sync-1: the worker running it shut down (send it again); sending it again" in user.out.getvalue()


def test_the_backoff_is_1_2_4_8_15_seconds_over_six_tries(scripted, monkeypatch):
    url = f"http://127.0.0.1:{scripted.server_address[1]}/v2/e"
    scripted.script = [(503, {})] * 6
    waits: list[float] = []
    monkeypatch.setattr(client.time, "sleep", waits.append)
    with pytest.raises(client.WorkerError, match=r"answered 503, 6 tries$"):
        client.Client(url, "key", out=io.StringIO()).status("j")
    assert waits == [1, 2, 4, 8, 15]
