"""Hub downloads that never hang and stop when asked: a child process downloads, the worker watches.

huggingface_hub downloads in the caller's thread with no way in: a stalled connection (reported for
Xet-backed repositories on RunPod) can wait for good, and a cancelled job would wait for a 30 GB
download to end. Here ``python -m fastbackend.hub_fetch`` downloads while the worker counts the
bytes arriving in the cache's ``blobs/``: progress comes from them, a stop ends the child within a
poll, and a child that receives nothing for ``FASTBACKEND_DOWNLOAD_STALL_S`` is ended and started
again with Xet off, up to ``TRIES`` times. Files that arrived whole stay in the cache, so each try,
and the next job, goes on from there; the file in flight starts over (huggingface_hub 2 writes each
to a temporary file of its own process, which the child removes when it is ended). The token
reaches the child through its environment, never its command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastbackend import settings, stopping
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.storage import NOT_LOADED

POLL_S = 0.25
REPORT_S = 5.0  # progress while bytes arrive, at most this often
TRIES = 3
END_WAIT_S = 5.0
HUB_TIMEOUT_S = 4.0  # the hub's answers on sizes: nice to have, never worth a wait (nor a late stop)
PACKAGE_PARENT = Path(__file__).resolve().parents[1]

Report = Callable[[int, int | None], None]  # (bytes so far, the whole download's bytes when known)


def fetch(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    cache: Path,
    field: str,
    report: Report | None = None,
    should_stop: Callable[[], bool] | None = None,
    shown: str | None = None,
) -> Path:
    """Download the files of hub repository ``repo_id`` that match ``patterns`` into the hub cache
    ``cache``; the snapshot folder. Raises ``JobStopped`` when stopped, and ``model_load_failed``
    naming ``field`` and the model as the user named it (``shown``) when the hub refuses or the
    download stalled ``TRIES`` times."""
    shown = shown or repr(repo_id)
    should_stop = should_stop or stopping.this_jobs_request()
    if _offline():
        raise FastBackendError(
            f"{field}: could not load {shown}: it is in no hub cache on this worker, and HF_HUB_OFFLINE is set",
            code=ErrorCode.MODEL_LOAD_FAILED,
        )
    blobs = cache / f"models--{repo_id.replace('/', '--')}" / "blobs"
    total = _TotalBytes(repo_id, revision, patterns)
    stall_s = settings.DOWNLOAD_STALL_S.get()
    for attempt in range(TRIES):
        outcome = _run_child(repo_id, revision, patterns, cache, attempt, _Watch(blobs, report, total, should_stop))
        if outcome == "done":
            return _snapshot(repo_id, revision, patterns, cache, f"{field}: could not load {shown}")
        if outcome != "stalled":
            raise FastBackendError(f"{field}: could not load {shown} ({outcome})", code=ErrorCode.MODEL_LOAD_FAILED)
    raise FastBackendError(
        f"{field}: could not load {shown}: its download stalled {TRIES} times (no byte for {stall_s:g} s; the "
        f"last {TRIES - 1} tries with Xet off); the files that arrived whole are kept: send the job again to go on",
        code=ErrorCode.MODEL_LOAD_FAILED,
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in settings.TRUE_WORDS


class _TotalBytes:
    """The download's size, asked of the hub in a thread of its own: the download never waits for it."""

    def __init__(self, repo_id: str, revision: str | None, patterns: list[str]):
        self.value: int | None = None
        args = (repo_id, revision, patterns)
        threading.Thread(target=self._ask, args=args, name="download-size", daemon=True).start()

    def _ask(self, repo_id: str, revision: str | None, patterns: list[str]) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import filter_repo_objects

        try:
            info = HfApi().model_info(
                repo_id, revision=revision, files_metadata=True, token=settings.HF_TOKEN.get(), timeout=HUB_TIMEOUT_S
            )
        except Exception:  # offline, gated without a token, unknown: the download itself will say
            return
        sizes = {f.rfilename: f.size or 0 for f in info.siblings or []}
        wanted = filter_repo_objects(sizes, allow_patterns=patterns, ignore_patterns=NOT_LOADED)
        self.value = sum(sizes[name] for name in wanted) or None


class _Watch:
    """What the worker watches while a child downloads: bytes in ``blobs``, and the stop request."""

    def __init__(self, blobs: Path, report: Report | None, total: _TotalBytes, should_stop: Callable[[], bool]):
        self.blobs, self.report, self.total, self.should_stop = blobs, report, total, should_stop
        self.reported_at = 0.0

    def progress(self, seen: int) -> None:
        if self.report is not None and time.monotonic() - self.reported_at >= REPORT_S:
            self.reported_at = time.monotonic()
            self.report(seen, self.total.value)


def _run_child(
    repo_id: str, revision: str | None, patterns: list[str], cache: Path, attempt: int, watch: _Watch
) -> str:
    """One try: "done", "stalled", or the child's own last line (why the hub refused)."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if attempt:
        env["HF_HUB_DISABLE_XET"] = "1"  # a retry takes the plain HTTP path
    if token := settings.HF_TOKEN.get():
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "fastbackend.hub_fetch", repo_id, revision or "", str(cache), json.dumps(patterns)]
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a chatty child never blocks on it
        child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            outcome = _watch(child, watch)
        finally:
            _end(child)  # stopped, stalled, or the worker failing here: no download goes on alone
        if outcome != "exited":
            return outcome
        if child.returncode == 0:
            return "done"
        errors.seek(0)
        lines = errors.read().strip().splitlines()
        return lines[-1][:300] if lines else f"the download ended with exit status {child.returncode}"


def _watch(child: subprocess.Popen, watch: _Watch) -> str:
    seen, changed_at = -1, time.monotonic()
    while child.poll() is None:
        if watch.should_stop():  # the caller ends the child
            raise stopping.JobStopped(
                f"the model's download stopped by {stopping.cause_in_words()}; the files that arrived whole are "
                "kept and the next run goes on from there"
            )
        now = _bytes_in(watch.blobs)
        if now != seen:
            seen, changed_at = now, time.monotonic()
            watch.progress(now)
        elif time.monotonic() - changed_at > settings.DOWNLOAD_STALL_S.get():
            return "stalled"
        time.sleep(POLL_S)
    return "exited"


def _end(child: subprocess.Popen) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(END_WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _bytes_in(folder: Path) -> int:
    """The bytes in ``folder``'s files now, partial downloads included (files renamed meanwhile count as none)."""
    total = 0
    for path in folder.glob("*"):
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], cache: Path, failed: str) -> Path:
    """The downloaded snapshot's folder; ``model_load_failed`` (``failed``: its start) when the
    repository holds none of the files asked for (the hub library only logs that)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=patterns,
            ignore_patterns=NOT_LOADED,
            local_files_only=True,
        )
    except Exception as exc:
        raise FastBackendError(
            f"{failed}: the repository has none of the files this worker loads ({', '.join(patterns)})",
            code=ErrorCode.MODEL_LOAD_FAILED,
        ) from exc
    return Path(folder)


def main(argv: list[str]) -> None:
    """The child: one snapshot download into the cache."""
    from huggingface_hub import snapshot_download

    repo_id, revision, cache, patterns = argv
    snapshot_download(
        repo_id,
        revision=revision or None,
        cache_dir=cache,
        allow_patterns=json.loads(patterns),
        ignore_patterns=NOT_LOADED,
        token=os.environ.get("HF_TOKEN") or None,
    )


def _end_cleanly(signum: int, frame: object) -> None:
    """The child's SIGTERM: remove the partial files it is writing (huggingface_hub downloads in
    threads of its own, which would neither run their cleanup nor let the process exit), then exit."""
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            target = str(descriptor.readlink())
        except OSError:  # closed meanwhile
            continue
        if target.endswith(".incomplete"):
            Path(target).unlink(missing_ok=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _end_cleanly)
    try:
        main(sys.argv[1:])
    except Exception as exc:  # the worker shows this line; the traceback stays in the child
        first = str(exc).strip().splitlines()
        print(f"{type(exc).__name__}: {first[0] if first else ''}", file=sys.stderr)
        sys.exit(1)
