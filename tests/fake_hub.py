"""A model hub on loopback, as huggingface_hub's downloads read it, that can stall mid-file.

It serves one repository from a local folder: the revision's commit and file list
(``/api/models/<repo>[/revision/<rev>]``), its tree (``/api/models/<repo>/tree/<commit>``) and its
files (``HEAD``/``GET /<repo>/resolve/<commit>/<path>``, ranges included, as resumed downloads ask).
``stall_first`` makes the first that many ``GET``s of the largest file send part of it, then
nothing, until the client gives up. Point ``HF_ENDPOINT`` at ``url``: no name is looked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path, stall_first: int = 0, byte_delay_s: float = 0.0):
        self.repo_id = repo_id
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}
        self.largest = max(self.files, key=lambda name: len(self.files[name]))
        self.stall_first = stall_first
        self.byte_delay_s = byte_delay_s  # per 64 KiB sent: a slow link
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.authorizations: list[str] = []  # the Authorization headers sent
        self.stalled = 0
        self._closing = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def do_GET(self) -> None:
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ answers

    def serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:  # noqa: RET503
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range")))
        if authorization := request.headers.get("Authorization"):
            self.authorizations.append(authorization)
        api = f"/api/models/{self.repo_id}/"
        if path == api.rstrip("/"):  # the default branch's record
            return self.json(request, self.info())
        if path.startswith(api + "revision/"):
            if path[len(api + "revision/") :] not in ("main", COMMIT):
                return self.json(request, {"error": "Invalid rev id"}, status=404, code="RevisionNotFound")
            return self.json(request, self.info())
        if path.startswith(api + "tree/"):
            return self.json(request, self.tree())
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(resolve):
            name = path[len(resolve) :].split("/", 1)[1]
            if name in self.files:
                return self.file(request, name, body)
            return self.json(request, {"error": "Entry not found"}, status=404, code="EntryNotFound")
        self.json(request, {"error": "Repository not found"}, status=404, code="RepoNotFound")

    def info(self) -> dict:
        siblings = [{"rfilename": name, "size": len(data)} for name, data in self.files.items()]
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False, "siblings": siblings}

    def tree(self) -> list[dict]:
        entries = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def json(self, request: BaseHTTPRequestHandler, answer: object, status: int = 200, code: str = "") -> None:
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        if code:
            request.send_header("X-Error-Code", code)
        request.end_headers()
        request.wfile.write(data)

    def file(self, request: BaseHTTPRequestHandler, name: str, body: bool) -> None:
        data = self.files[name]
        start = 0
        if (wanted := request.headers.get("Range")) and wanted.startswith("bytes="):
            start = int(wanted[len("bytes=") :].split("-")[0])
        part = data[start:]
        request.send_response(206 if start else 200)
        request.send_header("Content-Length", str(len(part)))
        request.send_header("X-Repo-Commit", COMMIT)
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.send_header("Accept-Ranges", "bytes")
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if not body:
            return
        stall = name == self.largest and self.stalled < self.stall_first
        if stall:
            self.stalled += 1
            part = part[: len(part) // 2]
        try:
            for offset in range(0, len(part), 65536):
                request.wfile.write(part[offset : offset + 65536])
                request.wfile.flush()
                time.sleep(self.byte_delay_s)
        except (BrokenPipeError, ConnectionResetError):  # the download was ended: what a hub sees too
            return
        if stall:
            self._closing.wait()  # half the file, then silence: the connection stays open


@contextlib.contextmanager
def serving(monkeypatch, repo_id: str, folder: Path, **options) -> Iterator[FakeHub]:
    """``folder`` served as hub repository ``repo_id``, with the hub library pointed at it and online."""
    import huggingface_hub.constants

    with FakeHub(repo_id, folder, **options) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the download child's hub
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # the worker's own size question
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield hub
