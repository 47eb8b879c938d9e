"""The user's tool: photos on a laptop to a downloaded LoRA, through a RunPod endpoint.

    python -m fastbackend.client --url https://api.runpod.ai/v2/<endpoint id> --api-key $RUNPOD_API_KEY \\
        train examples/training.yaml --photos ./photos
    python -m fastbackend.client --url ... status JOB | wait JOB | cancel JOB
    python -m fastbackend.client --url ... list
    python -m fastbackend.client --url ... download nowy_dataset_1.3 ./loras/
    python -m fastbackend.client --url http://localhost:8000 upload matt_training_test ./photos

Training goes by ``/run`` and is followed through ``/status`` (the job id is printed at once,
progress as it comes); Ctrl-C cancels the job. Short requests go by ``/runsync``, followed the
same way when RunPod answers before they end. Uploads are split under RunPod's 10 MB limit;
downloads land in a ``.part`` file that a later run resumes, checked against the worker's sha256.
Connection errors, 429 and 5xx are retried with backoff, a bounded number of times.

It talks plain HTTP with ``requests`` rather than through ``runpod.Endpoint``: that client needs an
API key (the local ``--rp_serve_api`` server takes none), builds URLs from an endpoint id under one
base (the local server has no ``/v2/<id>``), and retries only 408 and 429, only over http://.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import requests
import yaml
from urllib3.exceptions import NewConnectionError

from fastbackend.fingerprint import content_sha256

REQUEST_LIMIT_BYTES = 10_000_000
# Room for the JSON around the files, so that a batch never lands exactly on the limit.
BATCH_BYTES = REQUEST_LIMIT_BYTES - 100_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
POLL_INTERVAL_S = 5.0
RETRIES = 5  # per HTTP call, on a connection error, 429 or 5xx
BACKOFF_S = 1.0  # doubled after each retry, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 15.0
RETRIED_STATUS = {429, 500, 502, 503, 504}
# A job is sent again only on answers that say it was not taken: a 502 or 504 may have queued it.
RETRIED_SUBMIT_STATUS = {429, 503}
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
DEFAULT_MAX_HOURS = 6.0  # a training's execution timeout; an endpoint's own default is 10 minutes
MAX_HOURS = 144.0  # RunPod takes a per-request execution timeout and ttl of at most 7 days
MAX_TTL_MS = 7 * 24 * 3600 * 1000
CANCEL_WAIT_S = 60.0  # after Ctrl-C, how long to wait for RunPod to confirm the stop
MISMATCH_TRIES = 3  # uploads + trainings when each lands on a volume without the photos
SHUTDOWN_RESENDS = 3  # a job sent again after the worker running it shut down


class WorkerError(RuntimeError):
    """A one-line problem: the worker's error, or the endpoint's, or the network's."""


class JobStopped(WorkerError):
    """A job RunPod stopped (cancelled, or past its execution timeout) before it finished."""


class WorkerShutDown(JobStopped):
    """The worker was shut down (RunPod scaled it down) before or while it ran the job: sent again,
    it runs on another worker, a training resuming from its newest save."""


def number(value: object) -> float | None:
    """``value`` as a finite number, or None: progress shapes are the worker's to change."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class ProgressView:
    """A job's progress updates on a terminal: a bar for steps (loss, ETA), the bytes of a download,
    the stage name otherwise. Any shape is shown or skipped; none raises."""

    def __init__(self, out: TextIO):
        self.out = out
        self.bar: Any = None
        self.last_line = ""

    def update(self, progress: object) -> None:
        if not isinstance(progress, dict):
            return
        step, total = number(progress.get("step")), number(progress.get("total_steps"))
        if step is not None and total is not None and total >= 1:
            self._step(int(step), int(total), number(progress.get("loss")))
            return
        stage = progress.get("stage")
        if not isinstance(stage, str):
            return
        line = stage[:80] + _details(progress)
        if line != self.last_line:
            self.last_line = line
            self._write(line)

    def finish(self) -> None:
        """The job completed: its bar ends full."""
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _step(self, step: int, total: int, loss: float | None) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            self.close()
            start = min(step, total)  # a resumed run, or one first seen mid-way: its rate from here on
            self.bar = tqdm(total=total, initial=start, unit="step", desc="training", file=self.out, dynamic_ncols=True)
        self.bar.update(max(0, min(step, total) - self.bar.n))
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)


def _details(progress: dict) -> str:
    """What a stage line adds: the bytes downloaded, the step, the dataset."""
    parts = []
    downloaded = number(progress.get("downloaded_bytes"))
    if downloaded is not None:
        parts.append(f"{downloaded / 1e9:.2f} GB downloaded")
    step = number(progress.get("step"))
    if step is not None:
        parts.append(f"step {int(step)}")
    for key in ("model", "dataset"):
        if isinstance(progress.get(key), str):
            parts.append(f"{key} {progress[key][:80]}")
    return f" ({', '.join(parts)})" if parts else ""


class Client:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        webhook: str | None = None,
        max_hours: float = DEFAULT_MAX_HOURS,
        out: TextIO = sys.stderr,
        poll_s: float = POLL_INTERVAL_S,
        retries: int = RETRIES,
        backoff_s: float = BACKOFF_S,
    ):
        self.url, self.webhook, self.max_hours, self.out = url.rstrip("/"), webhook, max_hours, out
        self.poll_s, self.retries, self.backoff_s = poll_s, retries, backoff_s
        # runpod's local server (--rp_serve_api) has no /cancel and no progress, and runs a job while
        # /runsync (or /status) waits; a RunPod endpoint (and devtools.endpoint) lives under /v2/<id>.
        self.local = "/v2/" not in self.url
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # ------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: dict | None = None, submit: bool = False) -> dict:
        """One call to the endpoint, retried on connection errors, 429 and 5xx with backoff. A job
        submission is retried only when it cannot have been queued (no connection, 429, 503)."""
        read_timeout = None if self.local else (150 if path == "runsync" else 60)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self.session.request(method, f"{self.url}/{path}", json=body, timeout=(10, read_timeout))
            except requests.ConnectionError as exc:
                if submit and not _never_connected(exc):
                    raise WorkerError(f"{path}: the connection broke while sending the job ({exc})") from None
                problem = f"cannot reach {self.url} ({type(exc).__name__})"
                continue
            except requests.Timeout:
                if submit:
                    raise WorkerError(f"{path}: no answer in time; the job may have been queued") from None
                problem = f"{self.url} did not answer in time"
                continue
            if response.status_code in (RETRIED_SUBMIT_STATUS if submit else RETRIED_STATUS):
                problem = f"{self.url} answered {response.status_code}"
                continue
            return self._answer(response, path)
        raise WorkerError(f"{problem}, {self.retries + 1} tries")

    def _answer(self, response: requests.Response, path: str) -> dict:
        if response.status_code == 401:
            raise WorkerError("401 Unauthorized: the API key is missing or wrong (--api-key or RUNPOD_API_KEY)")
        if response.status_code == 404 and path.startswith(("status/", "cancel/")):
            raise WorkerError(f"job {path.split('/', 1)[1]!r}: no such job on this endpoint (or its result expired)")
        if response.status_code == 413:
            raise WorkerError(f"{path}: the request is over RunPod's size limit for /{path}")
        if response.status_code >= 400:
            raise WorkerError(f"{path}: {self.url} answered {response.status_code} {response.text[:200]}")
        try:
            answer = response.json()
        except ValueError:
            raise WorkerError(f"{path}: {self.url} answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise WorkerError(f"{path}: {self.url} answered {type(answer).__name__}, not a job")
        return answer

    # ------------------------------------------------------------ jobs

    def submit(
        self, payload: dict, route: str, policy: dict | None = None, notify: bool = False, once: bool = True
    ) -> dict:
        """Send one job by ``/run`` or ``/runsync``; returns RunPod's view of it (id, status, ...).
        ``once``: a job that must not run twice (a training) is sent again only when it cannot have
        been queued; the client's short requests may run twice harmlessly (an upload sent again
        skips the photos it brought, a listing or a chunk is read again)."""
        body: dict[str, Any] = {"input": payload}
        if notify and self.webhook:
            body["webhook"] = self.webhook
        if policy and not self.local:
            body["policy"] = policy
        try:
            return self._request("POST", route, body, submit=once)
        except KeyboardInterrupt:
            if once:
                print("interrupted while sending: the job may have been queued; see RunPod's console", file=self.out)
            raise

    def status(self, job_id: str) -> dict:
        return self._request("GET", f"status/{job_id}")

    def cancel(self, job_id: str) -> dict:
        if self.local:
            raise WorkerError("the local server (--rp_serve_api) cannot cancel a job; stop the server")
        return self._request("POST", f"cancel/{job_id}")

    def wait(self, view: dict, show: Callable[[object], None] | None = None) -> dict:
        """Follow a job through ``/status`` until it ends; returns its final view."""
        while view.get("status") not in FINAL:
            if show is not None and view.get("output") is not None:
                show(view["output"])
            time.sleep(self.poll_s)
            view = self.status(str(view["id"]))
        return view

    def call(self, payload: dict) -> dict:
        """A short request (upload batch, listing, download chunk): its output, or WorkerError."""
        return self._resent(lambda: output_of(self.wait(self.submit(payload, "runsync", once=False))))

    def _resent(self, send: Callable[[], dict]) -> dict:
        """``send()``, sent again when the worker running it shut down (RunPod scaled it down)."""
        for _ in range(SHUTDOWN_RESENDS):
            try:
                return send()
            except WorkerShutDown as exc:
                print(f"{exc}; sending it again", file=self.out, flush=True)
        return send()

    def run(self, payload: dict, notify: bool = True) -> dict:
        """A long request (training): by ``/run`` with an execution timeout, the job id printed at once,
        progress shown, Ctrl-C turned into ``/cancel``."""
        if self.local:  # the local server runs it while /runsync waits: no id to follow, nothing to cancel
            return output_of(self.submit(payload, "runsync", notify=notify))
        return self._resent(lambda: self._run_once(payload, notify))

    def _run_once(self, payload: dict, notify: bool) -> dict:
        view = self.submit(payload, "run", policy=self.policy(), notify=notify)
        job_id = str(view.get("id"))
        print(f"job {job_id} sent; follow it: {self.command('wait', job_id)}", file=self.out, flush=True)
        print(f"  cancel it: {self.command('cancel', job_id)}", file=self.out, flush=True)
        return self.follow(view)

    def follow(self, view: dict, cancel_on_interrupt: bool = True) -> dict:
        """``wait`` with a progress view; Ctrl-C sends ``/cancel`` (or, watching a job sent earlier,
        only stops watching and says how to cancel it)."""
        shown = ProgressView(self.out)
        try:
            final = self.wait(view, shown.update)
        except KeyboardInterrupt:
            shown.close()
            if cancel_on_interrupt:
                self.stop_after_interrupt(str(view["id"]))
            else:
                print(
                    f"\nstopped watching; the job goes on. Cancel it: {self.command('cancel', str(view['id']))}",
                    file=self.out,
                    flush=True,
                )
            raise
        except BaseException:
            shown.close()
            raise
        (shown.finish if final.get("status") == "COMPLETED" else shown.close)()
        return output_of(final)

    def stop_after_interrupt(self, job_id: str) -> None:
        """Ctrl-C: cancel the job and wait (bounded) until RunPod says it stopped. A second Ctrl-C
        leaves at once."""
        print(f"\nCtrl-C: cancelling job {job_id} (Ctrl-C again to leave without waiting)", file=self.out, flush=True)
        try:
            view = self.cancel(job_id)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while view.get("status") not in FINAL and time.monotonic() < deadline:
                time.sleep(min(self.poll_s, 1.0))
                view = self.status(job_id)
            print(f"job {job_id}: {view.get('status')}. {RESUME_HINT}", file=self.out, flush=True)
        except KeyboardInterrupt:
            print(f"left; check the job with: {self.command('status', job_id)}", file=self.out, flush=True)
        except WorkerError as exc:
            print(f"could not cancel job {job_id}: {exc}", file=self.out, flush=True)

    def policy(self) -> dict:
        """RunPod's per-request execution policy: ``executionTimeout`` from ``--max-hours`` (an endpoint's
        default stops a job after 10 minutes), and a ``ttl`` (queue and run together, at most 7 days)
        that leaves a day in the queue besides."""
        timeout_ms = int(self.max_hours * 3600 * 1000)
        return {"executionTimeout": timeout_ms, "ttl": min(timeout_ms + 24 * 3600 * 1000, MAX_TTL_MS)}

    def command(self, verb: str, job_id: str) -> str:
        key = " --api-key $RUNPOD_API_KEY" if "Authorization" in self.session.headers else ""
        return f"python -m fastbackend.client --url {self.url}{key} {verb} {job_id}"

    # ------------------------------------------------------------ the user's chores

    def train(self, yaml_text: str, photos: Path | None = None, resume: bool = True) -> dict:
        """Train ``yaml_text``; with ``photos``, on that folder whatever volume the job lands on: the
        training names the photos' fingerprint, and brings them only when the volume it landed on
        lacks them (inside the request when they fit; else uploaded first, which an endpoint with
        several volumes cannot promise to land on the same volume)."""
        payload: dict[str, Any] = {"type": "train_with_yaml", "yaml_config": yaml_text, "resume": resume}
        if photos is None:
            return self.run(payload)
        name, sha256 = dataset_name(yaml_text), folder_sha256(photos)
        try:
            return self.run(payload | {"datasets": {name: {"sha256": sha256}}})
        except WorkerError as exc:
            if not str(exc).startswith("dataset_mismatch:"):
                raise
        size = request_bytes(photos)
        if size + len(yaml_text) < BATCH_BYTES:
            print(f"sending the photos with the training ({name})", file=self.out, flush=True)
            return self.run(payload | {"datasets": {name: {"sha256": sha256, "files": photo_entries(photos)}}})
        self.upload_folder(name, photos, mode="replace")
        try:
            return self.run(payload | {"datasets": {name: {"sha256": sha256}}})
        except WorkerError as exc:
            if not str(exc).startswith("dataset_mismatch:"):
                raise
            raise WorkerError(
                f"{exc}; the photos ({size / 1e6:.0f} MB) need several requests, which an endpoint "
                "with volumes in several data centres spreads over them: keep the endpoint to one volume"
            ) from None

    def upload_folder(self, name: str, folder: Path, mode: str = "append", auto_caption: bool = False) -> dict:
        """Every image in ``folder`` with its ``.txt`` caption, in as many requests as the limit needs;
        with ``auto_caption`` the worker captions the images that have no ``.txt``."""
        answers: list[dict] = []
        options: dict = {}
        groups = batches(folder)
        for index, batch in enumerate(groups):
            payload = {
                "type": "upload_training_data",
                "training_name": name,
                "files": batch,
                "mode": mode if index == 0 else "append",
            }
            print(f"uploading {name}: request {index + 1} of {len(groups)}", file=self.out, flush=True)
            answers.append(self.call(payload | ({"auto_caption": options or True} if auto_caption else {})))
            if "auto_captions" in answers[-1]:  # one class word for the whole dataset: the first request's
                options = {"class_word": answers[-1]["auto_captions"]["class_word"]}
        if not answers:
            raise WorkerError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        last = answers[-1]
        return (
            last
            | {
                "uploaded_files": [f for a in answers for f in a["uploaded_files"]],
                "skipped": [s for a in answers for s in a["skipped"]],
                "requests": len(answers),
            }
            | _merged_captions(answers)
        )

    def download(
        self, model: str, destination: Path | str, filename: str | None = None, chunk_bytes: int | None = None
    ) -> Path:
        """A LoRA in chunks into ``<file>.<sha256>.part``, resumed from its size when a download was cut,
        checked against the worker's sha256, then renamed: the final name only ever holds the whole file."""
        ask = {"type": "download_model", "model": model} | ({"filename": filename} if filename else {})
        first = self.call(ask | {"length": 1})
        name = Path(str(first["filename"])).name  # the worker's name, never a path it could lead out by
        if not name.endswith(".safetensors"):
            raise WorkerError(f"{model}: the worker named the file {first['filename']!r}")
        target = Path(destination, name) if _is_folder(destination) else Path(destination)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and _sha256_of(target) == first["sha256"]:
            return target
        part = target.with_name(f"{target.name}.{first['sha256'][:16]}.part")  # another version never resumes
        offset: int | None = part.stat().st_size if part.is_file() else 0
        if offset and offset > first["total_size"]:
            part.unlink()
            offset = 0
        with part.open("ab") as handle:
            while offset is not None and offset < first["total_size"]:
                chunk = self.call(ask | {"offset": offset} | ({"length": chunk_bytes} if chunk_bytes else {}))
                if chunk["sha256"] != first["sha256"]:
                    raise WorkerError(f"{model}: the file changed on the worker during the download; run it again")
                data = base64.b64decode(chunk["content"])
                end = chunk["next_offset"] if chunk["next_offset"] is not None else first["total_size"]
                if end <= offset or len(data) != end - offset:
                    raise WorkerError(f"{model}: a chunk at {offset} does not follow on; run the download again")
                handle.write(data)
                handle.flush()
                offset = chunk["next_offset"]
        if _sha256_of(part) != first["sha256"]:
            part.unlink()
            raise WorkerError(f"{target.name}: sha256 mismatch after download; removed, run it again")
        part.replace(target)
        return target


RESUME_HINT = (
    "The worker keeps the newest step save; send the same `train` command again to continue from it "
    "(training resumes by default)."
)


def output_of(view: dict) -> dict:
    """A final job view's output, or WorkerError (JobStopped for a stop) with one line that says why."""
    status = view.get("status")
    output = view.get("output")
    if status == "COMPLETED" and isinstance(output, dict):
        return output
    job = view.get("id", "?")
    if status == "CANCELLED":
        raise JobStopped(f"job {job} was cancelled. {RESUME_HINT}")
    if status == "TIMED_OUT":
        raise JobStopped(
            f"job {job} was stopped by the endpoint's execution timeout (--max-hours sets a training's). {RESUME_HINT}"
        )
    if status not in FINAL:
        raise WorkerError(f"job {job} is {status}")
    code = output.get("error_code") if isinstance(output, dict) else None
    if isinstance(output, dict) and output.get("stopped_by") == "shutdown":
        raise WorkerShutDown(f"job {job}: the worker running it shut down ({output.get('resend', 'send it again')})")
    error = str(view.get("error") or f"job ended {status}")
    line = (error.splitlines() or [f"job ended {status}"])[0][:2000]
    raise WorkerError(f"{code}: {line}" if code else line)


def _never_connected(exc: requests.ConnectionError) -> bool:
    """Whether the connection failed before anything was sent (then a job cannot have been queued)."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError) or isinstance(exc, requests.ConnectTimeout)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _merged_captions(answers: list[dict]) -> dict:
    """The automatic captions of all of an upload's requests, as one answer would give them."""
    made = [a["auto_captions"] for a in answers if "auto_captions" in a]
    if not made:
        return {}
    return {"auto_captions": made[-1] | {"captions": {k: v for m in made for k, v in m["captions"].items()}}}


def photo_paths(folder: Path) -> list[Path]:
    """The folder's photos, sorted, as an upload takes them: no hidden files (macOS ``._`` copies),
    and one photo per name stem (``a.jpg`` and ``a.png`` would share ``a.txt``)."""
    paths = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    stems: dict[str, Path] = {}
    for path in paths:
        if (other := stems.setdefault(path.stem.lower(), path)) is not path:
            raise WorkerError(f"{other.name} and {path.name} share one caption file; rename one of them")
    return paths


def _caption(path: Path) -> str | None:
    """The photo's ``.txt`` caption (any case of the extension), as UTF-8."""
    for caption in (path.with_suffix(".txt"), path.with_suffix(".TXT")):
        if caption.is_file():
            try:
                return caption.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                raise WorkerError(f"{caption}: not UTF-8 text; save the caption as UTF-8") from None
    return None


def photo_entries(folder: Path) -> list[dict]:
    """The folder's images as an upload's ``files`` (base64, with their ``.txt`` captions)."""
    entries = []
    for path in photo_paths(folder):
        entry = {"filename": path.name, "content": base64.b64encode(path.read_bytes()).decode("ascii")}
        if (caption := _caption(path)) is not None:
            entry["caption"] = caption
        entries.append(entry)
    return entries


def request_bytes(folder: Path) -> int:
    """About what the folder's photos come to inside a request (base64, with their captions)."""
    return sum(path.stat().st_size * 4 // 3 + 1000 for path in photo_paths(folder))


def folder_sha256(folder: Path) -> str:
    """The folder's photos and captions as the worker fingerprints a dataset (fingerprint.content_sha256)."""
    return content_sha256((_sha256_of(path), _caption(path)) for path in photo_paths(folder))


def _is_folder(destination: Path | str) -> bool:
    """``download MODEL ./loras/``: a folder that exists, or a name written with a trailing slash."""
    return Path(destination).is_dir() or str(destination).endswith(("/", os.sep))


def dataset_name(yaml_text: str) -> str:
    """The one dataset an ai-toolkit config trains on (its ``folder_path``'s last part)."""
    try:
        datasets = yaml.safe_load(yaml_text)["config"]["process"][0]["datasets"]
        (dataset,) = datasets
        return str(dataset["folder_path"]).rstrip("/").rsplit("/", 1)[-1]
    except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError):
        raise WorkerError("--photos needs a config with exactly one dataset (config.process[0].datasets)") from None


def batches(folder: Path) -> list[list[dict]]:
    """Files of ``folder`` grouped so that each group's base64 stays under BATCH_BYTES."""
    groups: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for entry in photo_entries(folder):
        entry_size = len(json.dumps(entry))
        if entry_size > BATCH_BYTES:
            raise WorkerError(f"{entry['filename']} is too large for one request; upload it with `urls` instead")
        if current and size + entry_size > BATCH_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry_size
    return groups + ([current] if current else [])


def max_hours(text: str) -> float:
    """``--max-hours``: more than 0, at most RunPod's 7 days."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not 0.01 <= hours <= MAX_HOURS:
        raise argparse.ArgumentTypeError(f"{hours:g} is outside 0.01 to {MAX_HOURS:g} hours (RunPod's 7 days)")
    return hours


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Talk to a FastBackend worker.")
    parser.add_argument("--url", required=True, help="your RunPod endpoint's URL, or http://localhost:8000")
    parser.add_argument("--api-key", default=os.environ.get("RUNPOD_API_KEY"), help="default: $RUNPOD_API_KEY")
    parser.add_argument("--webhook", help="a URL RunPod posts a training's result to when it is done")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload a folder of photos (+ .txt captions)")
    upload.add_argument("name")
    upload.add_argument("folder", type=Path)
    upload.add_argument("--replace", action="store_true")
    upload.add_argument("--auto-caption", action="store_true", help="caption the images that have no .txt")
    caption = commands.add_parser("caption", help="caption a dataset's photos that have no caption")
    caption.add_argument("name")
    caption.add_argument("--again", action="store_true", help="also caption again what the captioner wrote")
    caption.add_argument("--trigger-word", help="names the person in each caption (default [trigger])")
    caption.add_argument("--class-word", help="what the person is (man, woman, ...)")
    train = commands.add_parser("train", help="train from an ai-toolkit YAML file")
    train.add_argument("config", type=Path)
    train.add_argument("--photos", type=Path, help="a folder of photos (+ .txt) the run trains on, sent with it")
    train.add_argument("--fresh", action="store_true", help="start over instead of resuming the newest save")
    train.add_argument(
        "--max-hours", type=max_hours, default=DEFAULT_MAX_HOURS, help="the job's execution timeout (default 6)"
    )
    commands.add_parser("health", help="the worker's health (its volume, version)")
    for verb, text in (("status", "a job's status"), ("wait", "follow a job to its end"), ("cancel", "cancel a job")):
        commands.add_parser(verb, help=text).add_argument("job")
    commands.add_parser("list", help="list the trained LoRAs")
    download = commands.add_parser("download", help="download a LoRA")
    download.add_argument("model")
    download.add_argument("destination", help="a folder (existing, or written with a trailing /) or a file name")
    return parser


def run_command(client: Client, args: argparse.Namespace) -> dict:
    if args.command == "upload":
        mode = "replace" if args.replace else "append"
        return client.upload_folder(args.name, args.folder, mode, auto_caption=args.auto_caption)
    if args.command == "caption":
        words = {"trigger_word": args.trigger_word, "class_word": args.class_word}
        options = {key: value for key, value in words.items() if value is not None}
        request = {"type": "caption_dataset", "training_name": args.name, "replace_automatic": args.again}
        return client.call(request | ({"auto_caption": options} if options else {}))
    if args.command == "train":
        return client.train(args.config.read_text(), args.photos, resume=not args.fresh)
    if args.command == "status":
        return client.status(args.job)
    if args.command == "cancel":
        return client.cancel(args.job)
    if args.command == "wait":
        return client.follow(client.status(args.job), cancel_on_interrupt=False)
    if args.command == "health":
        return client.call({"type": "health"})
    if args.command == "list":
        return client.call({"type": "list_models"})
    return {"path": str(client.download(args.model, args.destination))}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    client = Client(
        args.url, args.api_key, webhook=args.webhook, max_hours=getattr(args, "max_hours", DEFAULT_MAX_HOURS)
    )
    try:
        result = run_command(client, args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (WorkerError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
