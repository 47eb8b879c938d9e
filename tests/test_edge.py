"""The handler's contract: payload limits, dispatch, validation messages, error shape."""

import json

import pytest

import handler_fast
from fastbackend.errors import show_value
from handler_fast import handler


def body_size(job: dict) -> int:
    return len(json.dumps({"input": job["input"]}, ensure_ascii=False, separators=(",", ":")).encode())


def padded_job(target_bytes: int, job_id: str = "abc") -> dict:
    """A job whose request body is exactly ``target_bytes`` long (multi-byte text included)."""
    job = {"id": job_id, "input": {"type": "health", "pad": "é"}}
    job["input"]["pad"] += "x" * (target_bytes - body_size(job))
    assert body_size(job) == target_bytes
    return job


def test_health_answers_versions_and_data_root(data_root):
    answer = handler({"id": "1", "input": {"type": "health"}})
    assert answer["status"] == "healthy"
    assert answer["data_root"] == str(data_root)
    assert answer["volume_mounted"] is False
    assert answer["disk_free_gb"] > 0
    assert set(answer) >= {"version", "python", "runpod"}


def test_deep_health_says_no_gpu_on_cpu():
    answer = handler({"id": "1", "input": {"type": "health", "deep": True}})
    assert answer["gpu"]["available"] is False
    assert "no GPU" in answer["gpu"]["message"]


def test_unknown_type_lists_valid_types():
    answer = handler({"id": "1", "input": {"type": "train"}})
    assert answer["error_code"] == "unknown_type"
    assert answer["error"].startswith("input.type: unknown type 'train'; valid types: health, list_models")


@pytest.mark.parametrize("job", [None, [], "x", {}, {"input": "health"}, {"input": None}])
def test_malformed_jobs_are_refused(job):
    answer = handler(job)
    assert answer["error_code"] == "invalid_request"
    assert answer["error"] == 'input: the job must be {"input": {"type": ...}}'


@pytest.mark.parametrize("kind", [[], {}, None, 3])
def test_a_type_that_is_not_a_string_is_an_unknown_type(kind):
    answer = handler({"id": "1", "input": {"type": kind}})
    assert answer["error_code"] == "unknown_type"
    assert answer["error"].startswith(f"input.type: unknown type {str(kind)!r}; valid types: health")


def test_unknown_key_is_refused_with_its_name_and_the_valid_keys():
    answer = handler({"id": "1", "input": {"type": "health", "depp": True}})
    assert answer["error_code"] == "validation_error"
    assert answer["error"] == "input.depp: unknown key; valid keys: type, deep"


def test_wrong_type_names_field_and_value():
    answer = handler({"id": "1", "input": {"type": "health", "deep": "yes"}})
    assert answer["error"] == "input.deep: input should be a valid boolean, got 'yes'"


def test_every_problem_is_reported():
    answer = handler({"id": "1", "input": {"type": "download_model", "model": "../x", "offset": -1, "extra": 1}})
    assert answer["error"].endswith("(and 2 more problem(s), see details)")
    assert answer["details"] == [
        "input.model: must be 1-64 characters from A-Z a-z 0-9 . _ -, not starting with a dot, got '../x'",
        "input.offset: must be >= 0, got -1",
        "input.extra: unknown key; valid keys: type, model, filename, offset, length, url",
    ]


def test_error_shape_is_stable():
    answer = handler({"id": "1", "input": {"type": "nope"}})
    assert set(answer) == {"status", "error", "error_code", "details", "timestamp"}
    assert answer["status"] == "error"
    assert isinstance(answer["error"], str) and "\n" not in answer["error"]


def test_long_values_are_never_echoed():
    secret = "QUJD" * 1000
    answer = handler({"id": "1", "input": {"type": "health", "deep": secret}})
    assert secret not in json.dumps(answer)
    assert "<string of 4000 characters>" in answer["error"]
    assert show_value("short") == "'short'"


def test_unexpected_exception_is_internal_error_and_worker_keeps_serving(monkeypatch, caplog):
    def broken(request, progress):
        raise KeyError("boom")

    real_resolve = handler_fast.resolve
    monkeypatch.setattr(handler_fast, "resolve", lambda target: broken)
    answer = handler({"id": "1", "input": {"type": "health"}})
    assert answer["error_code"] == "internal_error"
    assert answer["error"] == "internal error (KeyError); see the worker log"
    assert "Traceback" in caplog.text
    monkeypatch.setattr(handler_fast, "resolve", real_resolve)
    assert handler({"id": "2", "input": {"type": "health"}})["status"] == "healthy"


@pytest.mark.parametrize(
    ("job_id", "limit"), [("abc-123", 10_000_000), ("sync-abc-123", 20_000_000), (None, 10_000_000)]
)
def test_payload_exactly_at_limit_passes_and_one_byte_over_fails(job_id, limit):
    at_limit = handler(padded_job(limit, job_id))
    # The size check passes, so validation is what refuses the padding key.
    assert at_limit["error"] == "input.pad: unknown key; valid keys: type, deep"
    over = handler(padded_job(limit + 1, job_id))
    assert over["error_code"] == "payload_too_large"
    assert over["error"].startswith(f"payload: {limit + 1:,} bytes is over the {limit:,}-byte limit for this route")
    assert "several upload_training_data requests" in over["error"] and "`urls`" in over["error"]


def test_payload_limit_follows_environment(monkeypatch):
    monkeypatch.setenv("FASTBACKEND_RUN_LIMIT_BYTES", "500")
    assert handler(padded_job(500))["error_code"] == "validation_error"
    assert handler(padded_job(501))["error_code"] == "payload_too_large"


def test_list_models_on_empty_root_is_an_empty_list():
    assert handler({"id": "1", "input": {"type": "list_models"}}) == {
        "status": "success",
        "models": [],
        "total_count": 0,
    }


def test_data_root_falls_back_to_local_data(monkeypatch, tmp_path):
    from fastbackend import storage

    monkeypatch.delenv("FASTBACKEND_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(storage, "RUNPOD_VOLUME", tmp_path / "no-volume")
    assert storage.data_root() == tmp_path / "data"
    (tmp_path / "no-volume").mkdir()
    assert storage.data_root() == tmp_path / "no-volume"


def test_progress_goes_to_runpod_at_most_every_interval(monkeypatch):
    sent = []
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "https://example.invalid/job-done")
    monkeypatch.setattr(handler_fast.runpod.serverless, "progress_update", lambda job, info: sent.append(info))
    times = iter([100.0, 101.0, 104.9, 105.1, 105.2, 105.3])
    send = handler_fast.progress_sender({"id": "j"}, clock=lambda: next(times))
    for step in range(1, 6):
        send({"step": step})
    send({"step": 6, "final": True})
    assert [info["step"] for info in sent] == [1, 4, 6]


def test_a_new_stage_is_sent_at_once_however_soon(monkeypatch):
    sent = []
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "https://example.invalid/job-done")
    monkeypatch.setattr(handler_fast.runpod.serverless, "progress_update", lambda job, info: sent.append(info))
    times = iter([100.0, 100.1, 100.2, 100.3, 100.4])
    send = handler_fast.progress_sender({"id": "j"}, clock=lambda: next(times))
    for stage in ("training", "training", "saving", "sampling", "training"):
        send({"stage": stage})
    assert [info["stage"] for info in sent] == ["training", "saving", "sampling", "training"]


def test_progress_interval_follows_the_environment(monkeypatch):
    sent = []
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "https://example.invalid/job-done")
    monkeypatch.setenv("FASTBACKEND_PROGRESS_INTERVAL_S", "1")
    monkeypatch.setattr(handler_fast.runpod.serverless, "progress_update", lambda job, info: sent.append(info))
    times = iter([100.0, 100.5, 101.1, 101.5])
    send = handler_fast.progress_sender({"id": "j"}, clock=lambda: next(times))
    for step in range(1, 5):
        send({"step": step})
    assert [info["step"] for info in sent] == [1, 3]
