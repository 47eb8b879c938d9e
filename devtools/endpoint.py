"""A RunPod serverless endpoint on loopback: both of its faces, for rehearsals and tests.

    python -m devtools.endpoint --workers 2 --volumes separate --time-scale 0.1

- The public job API a client talks to, under ``/v2/<endpoint id>/``: ``run``, ``runsync`` (held
  for RunPod's 90 s, then the job's current status), ``status/<id>``, ``cancel/<id>``, ``health``;
  the API key as a bearer token (401 without it); 413 over the 10 MB (``/run``) and 20 MB
  (``/runsync``) limits; ``policy.executionTimeout`` (ms, default 600 s) and ``policy.ttl`` (ms,
  default 24 h); ``webhook`` posted the final status.
- The worker side as runpod's SDK (1.12) reads it: ``RUNPOD_WEBHOOK_GET_JOB`` (``job-take``, a
  long poll), the stop channel derived from it (``job-stop``), ``RUNPOD_WEBHOOK_POST_OUTPUT``
  (``job-done``: progress with ``status: IN_PROGRESS``, then the result) and
  ``RUNPOD_WEBHOOK_PING``. Real ``python -u handler_fast.py`` processes take jobs through runpod's
  own fetch, stop and result code.
- Several workers, sharing one volume or with one each (an endpoint with network volumes in
  several data centres). ``--time-scale`` shrinks RunPod's waits and timeouts: at 0.05 the 90 s
  ``/runsync`` hold is 4.5 s and the default execution timeout 30 s.

Standard library only. Point the client at it with the URL and key it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
RUN_LIMIT_BYTES, RUNSYNC_LIMIT_BYTES = 10 * 1024 * 1024, 20 * 1024 * 1024
RUNSYNC_HOLD_S = 90.0  # RunPod answers a /runsync that has not finished after about this long
DEFAULT_EXECUTION_TIMEOUT_S = 600.0  # an endpoint's default execution timeout
DEFAULT_TTL_S = 24 * 3600.0
LONG_POLL_S = 2.0  # how long job-take and job-stop hold a worker's request (real seconds)
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
WEEK_MS = 7 * 24 * 3600 * 1000
# RunPod's bounds for a request's policy, in ms: executionTimeout 5 s to 7 days, ttl 10 s to 7 days.
POLICY_BOUNDS = {"executionTimeout": (5_000, WEEK_MS), "ttl": (10_000, WEEK_MS)}
WEBHOOK_RETRY_S = 10.0  # RunPod tries a webhook 3 times, 10 s apart


def policy_problem(body: dict) -> str | None:
    """What is wrong with a request's ``policy``, as RunPod would refuse it (400)."""
    policy = body.get("policy", {})
    if not isinstance(policy, dict):
        return "policy must be an object"
    for key, value in policy.items():
        if key not in POLICY_BOUNDS:
            continue  # RunPod's other policy keys (lowPriority, ...) mean nothing here
        low, high = POLICY_BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            return f"policy.{key}: {value!r} is not a number of ms from {low} to {high}"
    return None


@dataclass
class Job:
    id: str
    input: Any
    webhook: str | None
    execution_timeout_s: float  # already scaled
    expires_at: float  # the ttl's end (monotonic, scaled)
    created: float = field(default_factory=time.monotonic)
    status: str = "IN_QUEUE"
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    output: Any = None
    error: str | None = None

    def view(self) -> dict:
        """The job as RunPod's ``/status`` shows it."""
        answer: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            answer["delayTime"] = int((self.started - self.created) * 1000)
            answer["workerId"] = self.worker
        if self.started is not None and self.finished is not None:
            answer["executionTime"] = int((self.finished - self.started) * 1000)
        if self.output is not None:
            answer["output"] = self.output
        if self.error is not None:
            answer["error"] = self.error
        return answer


class Queue:
    """The endpoint's jobs: submitted by clients, taken and answered by workers, stopped by a cancel,
    the execution timeout or the ttl. Every change goes through ``changed`` (a condition)."""

    def __init__(self, time_scale: float = 1.0):
        self.scale = time_scale
        self.changed = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.waiting: deque[str] = deque()
        self.stops: dict[str, list[str]] = {}  # worker id -> job ids it must stop
        self.pings: dict[str, float] = {}
        self.taken_by: dict[str, int] = {}  # worker id -> jobs it took (for tests)

    def submit(self, body: dict, sync: bool) -> Job:
        """Queue a job (``body`` checked by ``policy_problem`` first)."""
        policy = body.get("policy") or {}
        timeout_s = policy.get("executionTimeout", DEFAULT_EXECUTION_TIMEOUT_S * 1000) / 1000
        ttl_s = policy.get("ttl", DEFAULT_TTL_S * 1000) / 1000
        job = Job(
            id=("sync-" if sync else "") + str(uuid.uuid4()),
            input=body["input"],
            webhook=body.get("webhook"),
            execution_timeout_s=timeout_s * self.scale,
            expires_at=time.monotonic() + ttl_s * self.scale,
        )
        with self.changed:
            self.jobs[job.id] = job
            self.waiting.append(job.id)
            self.changed.notify_all()
        return job

    def take(self, worker: str, wait_s: float) -> Job | None:
        """The next waiting job for ``worker`` (a long poll), now IN_PROGRESS on it."""
        with self.changed:
            self.changed.wait_for(lambda: bool(self.waiting), timeout=wait_s)
            if not self.waiting:
                return None
            job = self.jobs[self.waiting.popleft()]
            job.status, job.started, job.worker = "IN_PROGRESS", time.monotonic(), worker
            self.taken_by[worker] = self.taken_by.get(worker, 0) + 1
            self.changed.notify_all()
            return job

    def stops_for(self, worker: str, wait_s: float) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: bool(self.stops.get(worker)), timeout=wait_s)
            return self.stops.pop(worker, [])

    def answer(self, job_id: str, data: dict) -> None:
        """A worker's post: progress (``status: IN_PROGRESS``) or the result. Whatever a worker posts
        for a job already stopped is dropped, as the job's status is already final."""
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None or job.status in FINAL:
                return
            if data.get("status") == "IN_PROGRESS":
                job.output = data.get("output")
            else:
                job.output, job.error = data.get("output"), data.get("error")
                self._finish(job, "FAILED" if data.get("error") else "COMPLETED")
            self.changed.notify_all()

    def cancel(self, job_id: str) -> Job | None:
        with self.changed:
            job = self.jobs.get(job_id)
            if job is not None and job.status not in FINAL:
                self._stop(job, "CANCELLED")
            return job

    def expire(self) -> None:
        """Stop the jobs past their execution timeout (running) or their ttl (any)."""
        now = time.monotonic()
        with self.changed:
            for job in list(self.jobs.values()):
                if job.status in FINAL:
                    continue
                over_time = job.started is not None and now - job.started > job.execution_timeout_s
                if over_time or now > job.expires_at:
                    self._stop(job, "TIMED_OUT")

    def lost(self, worker: str) -> None:
        """The worker process is gone: the jobs it held fail (RunPod's answer to a worker lost mid-job)."""
        with self.changed:
            for job in self.jobs.values():
                if job.worker == worker and job.status == "IN_PROGRESS":
                    job.error = f"the worker running it ({worker}) was lost; send the job again"
                    self._finish(job, "FAILED")
            self.changed.notify_all()

    def wait_final(self, job: Job, wait_s: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: job.status in FINAL, timeout=wait_s)

    def health(self) -> dict:
        with self.changed:
            count = lambda *states: sum(job.status in states for job in self.jobs.values())  # noqa: E731
            running = {job.worker for job in self.jobs.values() if job.status == "IN_PROGRESS"}
            return {
                "jobs": {
                    "completed": count("COMPLETED"),
                    "failed": count("FAILED", "TIMED_OUT"),
                    "inProgress": count("IN_PROGRESS"),
                    "inQueue": count("IN_QUEUE"),
                    "retried": 0,
                },
                "workers": {"idle": len(set(self.pings) - running), "running": len(running)},
            }

    def _stop(self, job: Job, status: str) -> None:
        if job.status == "IN_PROGRESS" and job.worker is not None:
            self.stops.setdefault(job.worker, []).append(job.id)  # the worker hears it on its stop channel
        with contextlib.suppress(ValueError):
            self.waiting.remove(job.id)
        self._finish(job, status)
        self.changed.notify_all()

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished = status, time.monotonic()
        if job.webhook:
            retry_s = WEBHOOK_RETRY_S * self.scale
            threading.Thread(target=post_webhook, args=(job.webhook, job.view(), retry_s), daemon=True).start()


def post_webhook(url: str, body: dict, retry_s: float) -> None:
    """RunPod posts the final status to the request's webhook: three tries, ``retry_s`` apart."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    for _ in range(3):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(request, timeout=10).close()
            return
        time.sleep(retry_s)


PUBLIC = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<route>run|runsync|health|status|cancel)(?:/(?P<job>[^/?]+))?$")
WORKER = re.compile(
    r"^/v2/(?P<endpoint>[^/]+)/(?P<route>job-take|job-stop|job-done|ping)/(?P<worker>[^/]+)(?:/(?P<job>[^/]+))?$"
)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, queue: Queue, endpoint_id: str, api_key: str, worker_key: str, port: int = 0):
        super().__init__(("127.0.0.1", port), Handler)
        self.queue, self.endpoint_id, self.api_key, self.worker_key = queue, endpoint_id, api_key, worker_key

    @property
    def url(self) -> str:
        """What a client's ``--url`` is (RunPod's ``https://api.runpod.ai/v2/<endpoint id>``)."""
        return f"http://127.0.0.1:{self.server_address[1]}/v2/{self.endpoint_id}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(*self._route("GET"))

    def do_POST(self) -> None:
        self._send(*self._route("POST"))

    def _route(self, method: str) -> tuple[int, dict | None]:
        path = self.path.split("?", 1)[0]
        if match := WORKER.match(path):
            if self.headers.get("Authorization") != self.server.worker_key:
                return 401, {"error": "worker key"}
            return self._worker(method, match["route"], match["worker"], match["job"])
        match = PUBLIC.match(path)
        if match is None or match["endpoint"] != self.server.endpoint_id:
            return 404, {"error": "no such route"}
        if self.headers.get("Authorization", "").removeprefix("Bearer ") != self.server.api_key:
            return 401, {"error": "Unauthorized: the API key is missing or wrong"}
        return self._public(method, match["route"], match["job"])

    def _public(self, method: str, route: str, job_id: str | None) -> tuple[int, dict | None]:
        queue = self.server.queue
        if route in ("run", "runsync") and method == "POST":
            return self._submit(route)
        if route == "health" and method == "GET":
            return 200, queue.health()
        job = queue.jobs.get(job_id or "")
        if job is None:
            return 404, {"error": f"request {job_id} does not exist"}
        if route == "status" and method == "GET":
            return 200, job.view()
        if route == "cancel" and method == "POST":
            queue.cancel(job.id)
            return 200, {"id": job.id, "status": job.status}
        return 405, {"error": f"{method} {route}"}

    def _submit(self, route: str) -> tuple[int, dict | None]:
        queue = self.server.queue
        limit = RUNSYNC_LIMIT_BYTES if route == "runsync" else RUN_LIMIT_BYTES
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True  # the body is not read
            return 413, {"error": f"request body {length} bytes is over the {limit}-byte limit"}
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict) or "input" not in body:
                raise ValueError
        except ValueError:
            return 400, {"error": 'the body must be JSON {"input": ...}'}
        if problem := policy_problem(body):
            return 400, {"error": problem}
        job = queue.submit(body, sync=route == "runsync")
        if route == "run":
            return 200, {"id": job.id, "status": job.status}
        queue.wait_final(job, RUNSYNC_HOLD_S * queue.scale)
        return 200, job.view()

    def _worker(self, method: str, route: str, worker: str, job_id: str | None) -> tuple[int, dict | None]:
        queue = self.server.queue
        if route == "ping":
            queue.pings[worker] = time.monotonic()
            return 200, {}
        if route == "job-take":
            job = queue.take(worker, LONG_POLL_S)
            return (204, None) if job is None else (200, {"id": job.id, "input": job.input})
        if route == "job-stop":
            ids = queue.stops_for(worker, LONG_POLL_S)
            return (200, {"jobsToStop": ids}) if ids else (204, None)
        if route == "job-done" and method == "POST" and job_id:
            length = int(self.headers.get("Content-Length") or 0)
            queue.answer(job_id, json.loads(self.rfile.read(length)))  # runpod posts JSON as form data
            return 200, {}
        return 404, {"error": "no such route"}

    def _send(self, code: int, body: dict | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


@dataclass
class Worker:
    id: str
    volume: Path
    process: subprocess.Popen
    log: Path


class Endpoint:
    """The server, a ticker for timeouts, and the worker processes. A context manager."""

    def __init__(self, folder: Path, time_scale: float = 1.0, api_key: str | None = None, port: int = 0):
        self.folder = folder
        self.api_key = api_key or secrets.token_hex(16)
        self.endpoint_id = "local"
        self.queue = Queue(time_scale)
        self.server = Server(self.queue, self.endpoint_id, self.api_key, secrets.token_hex(16), port)
        self.workers: list[Worker] = []
        self._running = threading.Event()

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> Endpoint:
        self._running.set()
        for target in (self.server.serve_forever, self._tick):
            threading.Thread(target=target, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_workers()
        self._running.clear()
        self.server.shutdown()
        self.server.server_close()

    def _tick(self) -> None:
        while self._running.is_set():
            self.queue.expire()
            for worker in self.workers:
                if worker.process.poll() is not None:
                    self.queue.lost(worker.id)
            time.sleep(0.05)

    def start_worker(self, volume: Path, env: dict[str, str] | None = None, datacenter: str = "LOCAL-1") -> Worker:
        """A ``python -u handler_fast.py`` process taking this endpoint's jobs, with ``volume`` as its
        network volume (``FASTBACKEND_DATA_DIR``)."""
        worker_id = f"worker-{len(self.workers) + 1}"
        base = f"http://127.0.0.1:{self.server.server_address[1]}/v2/{self.endpoint_id}"
        volume.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{worker_id}.log"
        self.folder.mkdir(parents=True, exist_ok=True)
        process_env = os.environ | {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_AI_API_KEY": self.server.worker_key,
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
            "RUNPOD_DC_ID": datacenter,
            # runpod's start-up checks connect to a public DNS server, which loopback cannot reach.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            # A rehearsal on a machine without a GPU trains the user's cuda config on the CPU.
            "FASTBACKEND_CPU_FALLBACK": "1",
            "FASTBACKEND_DATA_DIR": str(volume),
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-u", "handler_fast.py"],
                cwd=REPOSITORY,
                env=process_env | (env or {}),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(worker_id, volume, process, log)
        self.workers.append(worker)
        return worker

    def start_workers(self, count: int, volumes: str, data: Path, env: dict[str, str] | None = None) -> None:
        """``count`` workers: on one shared volume (``data``), or each on its own (``data/volume-N``,
        in data centres LOCAL-N)."""
        for index in range(1, count + 1):
            if volumes == "shared":
                self.start_worker(data, env)
            else:
                self.start_worker(data / f"volume-{index}", env, datacenter=f"LOCAL-{index}")

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Until every running worker has pinged (runpod pings as its worker loop starts)."""
        deadline = time.monotonic() + timeout_s
        while any(w.id not in self.queue.pings for w in self.workers if w.process.poll() is None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not start within {timeout_s}s; see {self.folder}")
            time.sleep(0.1)

    def stop_workers(self, workers: list[Worker] | None = None, grace_s: float = 10.0) -> None:
        """SIGTERM, as RunPod scales a worker down, then SIGKILL after ``grace_s``."""
        chosen = self.workers if workers is None else workers
        for worker in chosen:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in chosen:
            try:
                worker.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            self.queue.pings.pop(worker.id, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A RunPod serverless endpoint on loopback, with real workers.")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--volumes", choices=["shared", "separate"], default="shared")
    parser.add_argument("--data", type=Path, default=Path("data"), help="the volume (or volumes' folder)")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--time-scale", type=float, default=1.0, help="RunPod's waits and timeouts times this")
    parser.add_argument("--api-key", default=None, help="default: a new random key, printed")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl-C: the workers go too
    with Endpoint(args.data / "endpoint-logs", args.time_scale, args.api_key, args.port) as endpoint:
        endpoint.start_workers(args.workers, args.volumes, args.data.resolve())
        print(f"endpoint: {endpoint.url}", flush=True)
        if args.api_key is None:  # one of its own, printed once; a key given is never echoed
            print(f"api key:  {endpoint.api_key}", flush=True)
        print(f"try:      RUNPOD_API_KEY=<key> python -m fastbackend.client --url {endpoint.url} health", flush=True)
        print(f"workers log to {args.data / 'endpoint-logs'}; Ctrl-C stops everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while all(worker.process.poll() is None for worker in endpoint.workers):
                time.sleep(0.5)


if __name__ == "__main__":
    main()
