"""The loopback RunPod endpoint (devtools/endpoint.py) keeps RunPod's contract on both faces.

A worker here is played over HTTP with the requests runpod's SDK makes (job-take, job-done with
progress, job-stop); tests/test_journey.py drives it with real worker processes.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from devtools.endpoint import Endpoint


@pytest.fixture
def endpoint(tmp_path):
    with Endpoint(tmp_path / "logs", time_scale=0.01, api_key="key") as running:
        yield running


def public(endpoint, method: str, path: str, body=None, key: str | None = "key", **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, f"{endpoint.url}/{path}", json=body, headers=headers, timeout=30, **kwargs)


class FakeWorker:
    """What runpod's JobScaler sends, by hand."""

    def __init__(self, endpoint, worker_id: str = "w1"):
        self.base = endpoint.url
        self.id = worker_id
        self.headers = {"Authorization": endpoint.server.worker_key}

    def take(self) -> dict | None:
        answer = requests.get(
            f"{self.base}/job-take/{self.id}?gpu=x&job_in_progress=0", headers=self.headers, timeout=30
        )
        return answer.json() if answer.status_code == 200 else None

    def post(self, job_id: str, data: dict) -> None:
        url = f"{self.base}/job-done/{self.id}/{job_id}?gpu=x&isStream=false"
        requests.post(url, data=json.dumps(data), headers=self.headers, timeout=30).raise_for_status()

    def stops(self) -> list[str]:
        answer = requests.get(f"{self.base}/job-stop/{self.id}?gpu=x", headers=self.headers, timeout=30)
        return answer.json()["jobsToStop"] if answer.status_code == 200 else []


def test_runsync_answers_the_status_after_its_hold_then_status_follows_progress_to_the_result(endpoint):
    started = time.monotonic()
    view = public(endpoint, "POST", "runsync", {"input": {"type": "health"}}).json()
    assert view["status"] == "IN_QUEUE" and view["id"].startswith("sync-")  # no worker: held 90 s x 0.01
    assert 0.8 < time.monotonic() - started < 5
    worker = FakeWorker(endpoint)
    job = worker.take()
    assert job == {"id": view["id"], "input": {"type": "health"}}
    worker.post(job["id"], {"status": "IN_PROGRESS", "output": {"stage": "training", "step": 3}})
    status = public(endpoint, "GET", f"status/{job['id']}").json()
    assert status["status"] == "IN_PROGRESS" and status["output"] == {"stage": "training", "step": 3}
    assert status["workerId"] == "w1"
    worker.post(job["id"], {"output": {"status": "success"}})
    final = public(endpoint, "GET", f"status/{job['id']}").json()
    assert final["status"] == "COMPLETED" and final["output"] == {"status": "success"} and "executionTime" in final
    worker.post(job["id"], {"output": {"late": True}})  # after the end: dropped
    assert public(endpoint, "GET", f"status/{job['id']}").json()["output"] == {"status": "success"}


def test_a_failed_job_carries_the_workers_error_and_output(endpoint):
    job_id = public(endpoint, "POST", "run", {"input": {"type": "x"}}).json()["id"]
    worker = FakeWorker(endpoint)
    worker.take()
    worker.post(job_id, {"output": {"error_code": "not_found"}, "error": "input.model: no such model"})
    final = public(endpoint, "GET", f"status/{job_id}").json()
    assert final["status"] == "FAILED" and final["error"] == "input.model: no such model"
    assert final["output"] == {"error_code": "not_found"}


def test_the_api_key_and_the_payload_limits_are_enforced(endpoint):
    assert public(endpoint, "POST", "run", {"input": {}}, key=None).status_code == 401
    assert public(endpoint, "POST", "run", {"input": {}}, key="wrong").status_code == 401
    assert public(endpoint, "GET", "health", key="wrong").status_code == 401
    big = {"input": {"blob": "x" * 11_000_000}}
    assert public(endpoint, "POST", "run", big).status_code == 413  # over /run's 10 MB
    answer = public(endpoint, "POST", "runsync", big)  # under /runsync's 20 MB: queued, then held
    assert answer.status_code == 200 and answer.json()["status"] == "IN_QUEUE"
    assert public(endpoint, "POST", "runsync", {"input": {"blob": "x" * 22_000_000}}).status_code == 413
    assert public(endpoint, "POST", "run", {"no": "input"}).status_code == 400
    assert public(endpoint, "GET", "status/no-such-job").status_code == 404
    assert public(endpoint, "POST", "cancel/no-such-job").status_code == 404


def test_a_cancel_stops_a_queued_job_at_once_and_a_running_one_through_its_workers_stop_channel(endpoint):
    queued = public(endpoint, "POST", "run", {"input": {"n": 1}}).json()["id"]
    assert public(endpoint, "POST", f"cancel/{queued}").json()["status"] == "CANCELLED"
    running = public(endpoint, "POST", "run", {"input": {"n": 2}}).json()["id"]
    worker = FakeWorker(endpoint)
    assert worker.take()["id"] == running  # the cancelled one was taken off the queue
    assert worker.stops() == []
    public(endpoint, "POST", f"cancel/{running}")
    assert worker.stops() == [running]
    assert public(endpoint, "GET", f"status/{running}").json()["status"] == "CANCELLED"
    assert public(endpoint, "GET", "health").json()["jobs"]["inProgress"] == 0


def test_the_execution_timeout_defaults_to_600_scaled_seconds_and_a_policy_sets_its_own(tmp_path):
    with Endpoint(tmp_path / "logs", time_scale=0.002, api_key="key") as endpoint:  # 600 s -> 1.2 s
        default = public(endpoint, "POST", "run", {"input": {}}).json()["id"]
        own = public(endpoint, "POST", "run", {"input": {}, "policy": {"executionTimeout": 5_000_000}}).json()["id"]
        worker, other = FakeWorker(endpoint), FakeWorker(endpoint, "w2")
        worker.take(), other.take()
        time.sleep(2.0)
        assert public(endpoint, "GET", f"status/{default}").json()["status"] == "TIMED_OUT"
        assert worker.stops() == [default]
        assert public(endpoint, "GET", f"status/{own}").json()["status"] == "IN_PROGRESS"  # 5,000 s x 0.002 = 10 s


def test_a_ttl_ends_a_job_that_waited_too_long_in_the_queue(endpoint):
    job_id = public(endpoint, "POST", "run", {"input": {}, "policy": {"ttl": 10_000}}).json()["id"]  # 0.1 s scaled
    time.sleep(0.5)
    assert public(endpoint, "GET", f"status/{job_id}").json()["status"] == "TIMED_OUT"
    assert FakeWorker(endpoint).take() is None


def test_the_webhook_gets_the_final_status(endpoint):
    received: list[dict] = []
    done = threading.Event()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            done.set()

        def log_message(self, *args):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        body = {"input": {}, "webhook": f"http://127.0.0.1:{hook.server_address[1]}/done"}
        job_id = public(endpoint, "POST", "run", body).json()["id"]
        worker = FakeWorker(endpoint)
        worker.take()
        worker.post(job_id, {"output": {"status": "success"}})
        assert done.wait(10)
        assert received == [public(endpoint, "GET", f"status/{job_id}").json()]
    finally:
        hook.shutdown()


@pytest.mark.parametrize(
    "policy",
    [{"executionTimeout": 1000}, {"executionTimeout": "600000"}, {"ttl": 8 * 24 * 3600 * 1000}, {"ttl": True}, []],
)
def test_a_policy_runpod_would_refuse_is_answered_400(endpoint, policy):
    answer = public(endpoint, "POST", "run", {"input": {}, "policy": policy})
    assert answer.status_code == 400 and "policy" in answer.json()["error"]


def test_a_job_whose_worker_process_died_fails_instead_of_running_forever(endpoint, tmp_path):
    import subprocess

    from devtools.endpoint import Worker

    process = subprocess.Popen(["sleep", "0.3"])
    endpoint.workers.append(Worker("w1", tmp_path, process, tmp_path / "log"))
    job_id = public(endpoint, "POST", "run", {"input": {}}).json()["id"]
    assert FakeWorker(endpoint, "w1").take()["id"] == job_id
    process.wait()
    time.sleep(0.3)
    final = public(endpoint, "GET", f"status/{job_id}").json()
    assert final["status"] == "FAILED" and final["error"] == "the worker running it (w1) was lost; send the job again"
