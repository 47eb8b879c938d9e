"""The RunPod serverless entry point: check the payload, validate the request, dispatch.

Every job is ``{"input": {"type": "<type>", ...}}``. The edge measures the payload against
RunPod's limits, validates ``input`` with the type's typed model, then calls the type's
operation, imported lazily from ``fastbackend`` so that light requests (``health``, listings,
uploads) never load torch. It always answers a dict: the operation's success, or
``{"status": "error", "error": "<one line>", "error_code", "details", "timestamp"}``.

Run it as RunPod does (``python handler_fast.py``), with ``--test_input '<json>'``, or as a
local server with ``--rp_serve_api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import runpod

from fastbackend import logs, settings, stopping
from fastbackend.errors import ErrorCode, FastBackendError, PayloadTooLarge, error_response
from fastbackend.schemas import (
    AnalyzeDatasetRequest,
    CaptionDatasetRequest,
    DeleteDatasetRequest,
    DeleteModelRequest,
    DownloadModelRequest,
    GenerateRequest,
    GetSamplesRequest,
    HealthRequest,
    ListDatasetsRequest,
    ListModelsRequest,
    Request,
    TrainWithYamlRequest,
    UploadTrainingDataRequest,
    parse_request,
)
from fastbackend.storage import disk_full, out_of_space

log = logging.getLogger("fastbackend.handler")


# type -> (request model, "module:function"), every function a request module in fastbackend.api.
# Modules are imported on first use.
OPERATIONS: dict[str, tuple[type[Request], str]] = {
    "health": (HealthRequest, "fastbackend.api.health:health"),
    "list_models": (ListModelsRequest, "fastbackend.api.loras:list_models"),
    "upload_training_data": (UploadTrainingDataRequest, "fastbackend.api.datasets:upload_training_data"),
    "list_datasets": (ListDatasetsRequest, "fastbackend.api.datasets:list_datasets"),
    "delete_dataset": (DeleteDatasetRequest, "fastbackend.api.datasets:delete_dataset"),
    "analyze_dataset": (AnalyzeDatasetRequest, "fastbackend.api.datasets:analyze_dataset"),
    "caption_dataset": (CaptionDatasetRequest, "fastbackend.api.datasets:caption_dataset"),
    "train_with_yaml": (TrainWithYamlRequest, "fastbackend.api.train:train_with_yaml"),
    "generate": (GenerateRequest, "fastbackend.api.generate:generate"),
    "get_samples": (GetSamplesRequest, "fastbackend.api.loras:get_samples"),
    "download_model": (DownloadModelRequest, "fastbackend.api.loras:download_model"),
    "delete_model": (DeleteModelRequest, "fastbackend.api.loras:delete_model"),
}


def payload_limit(job_id: object) -> int:
    """The byte limit for a job: /runsync's for ``sync-`` ids, /run's otherwise.

    RunPod documents the two limits; that /runsync ids start with "sync-" is observed, not
    documented (no field says which route a job came by).
    """
    limit = settings.RUNSYNC_LIMIT_BYTES if str(job_id).startswith("sync-") else settings.RUN_LIMIT_BYTES
    return limit.get()


def check_payload_size(job: dict) -> int:
    """Refuse a request body (``{"input": ...}`` as UTF-8 JSON) larger than its route allows.

    Returns the size in bytes. A body exactly at the limit passes.
    """
    try:
        size = len(json.dumps({"input": job.get("input")}, ensure_ascii=False, separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError) as exc:  # bytes, NaN or 50,000-deep nesting from a caller
        raise FastBackendError(f"input: not JSON data ({type(exc).__name__})", code=ErrorCode.INVALID_REQUEST) from None
    limit = payload_limit(job.get("id"))
    if size > limit:
        raise PayloadTooLarge(
            f"payload: {size:,} bytes is over the {limit:,}-byte limit for this route; send less per request: "
            "split files across several upload_training_data requests (mode: append), or pass `urls` "
            "(images or a .zip) for the worker to fetch"
        )
    return size


def resolve(target: str) -> Callable[..., dict]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def progress_sender(job: dict, clock: Callable[[], float] = time.monotonic) -> Callable[[dict], None]:
    """A callback that forwards progress to RunPod at most every ``settings.PROGRESS_INTERVAL_S``.

    Outside RunPod (``--test_input``, the local server) there is no endpoint to post to, so
    progress is logged instead. A progress dict with ``final``, or of a new ``stage``, is always sent.
    """
    last_sent, last_stage = 0.0, None
    on_runpod = settings.on_runpod()
    interval = settings.PROGRESS_INTERVAL_S.get()

    def send(progress: dict) -> None:
        nonlocal last_sent, last_stage
        now = clock()
        new_stage = progress.get("stage") != last_stage  # a short stage (saving) is never skipped
        if now - last_sent < interval and not progress.get("final") and not new_stage:
            return
        last_sent, last_stage = now, progress.get("stage")
        if on_runpod:
            runpod.serverless.progress_update(job, progress)
        else:
            log.info("progress: %s", json.dumps(progress, default=str))

    return send


def dispatch(job: dict) -> dict:
    """Validate ``job`` and run its operation; raises FastBackendError for bad input."""
    if not isinstance(job, dict) or not isinstance(job.get("input"), dict):
        raise FastBackendError('input: the job must be {"input": {"type": ...}}', code=ErrorCode.INVALID_REQUEST)
    size = check_payload_size(job)
    payload = job["input"]
    kind = payload.get("type")
    if not isinstance(kind, str) or kind not in OPERATIONS:  # a list or dict here is unhashable
        raise FastBackendError(
            f"input.type: unknown type {str(kind)[:64]!r}; valid types: {', '.join(OPERATIONS)}",
            code=ErrorCode.UNKNOWN_TYPE,
        )
    model, target = OPERATIONS[kind]
    request = parse_request(model, payload)
    log.info("job %s: %s (%s bytes of input)", job.get("id"), kind, size)
    return resolve(target)(request, progress=progress_sender(job))


def handler(job: Any) -> dict:
    """RunPod's entry point: always answers a dict, a success or an error, and never raises."""
    try:
        return dispatch(job)
    except FastBackendError as exc:
        log.warning("job %s refused: %s", _job_id(job), exc.message)
        return error_response(exc)
    except Exception as exc:  # the worker must keep serving; the traceback goes to the log only
        if out_of_space(exc):
            log.error("job %s: the volume is full", _job_id(job))  # files written before stay intact
            return error_response(disk_full())
        log.exception("job %s failed unexpectedly", _job_id(job))
        message = f"internal error ({type(exc).__name__}); see the worker log"
        return error_response(FastBackendError(message, code=ErrorCode.INTERNAL_ERROR))


async def async_handler(job: Any) -> dict:
    """What ``runpod.serverless.start`` runs: ``handler`` in a thread, the event loop left free.

    RunPod stops a job (``/cancel``, the execution timeout) by cancelling this coroutine, which
    only an event loop that is not busy training can do. Then the job's stop event is set, the
    thread is waited for (training saves its resumable state after the step it is in; an upload
    drops its staging folder) and the cancellation goes on to runpod, which takes the next job.
    """
    _stop_running_jobs_on_sigterm()
    if _worker_shutting_down():  # a job a job-take already under way handed out after SIGTERM
        stopping.request_shutdown()
        log.warning("job %s: the worker is shutting down; not started", _job_id(job))
        return error_response(stopping.JobStopped("the worker is shutting down and starts no new job; send it again"))
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(_handle_watching, job, stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        log.warning("job %s: stop signal received; stopping at the next safe point", _job_id(job))
        while not work.done():  # a second signal for the same job changes nothing: keep waiting
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(work)
        log.warning("job %s stopped: %s", _job_id(job), work.result().get("error", "it had finished"))
        raise


# One job at a time, whatever runs them: runpod's local server (and its realtime mode) would
# otherwise start a second job's model beside the first one's on the same GPU.
_one_job_at_a_time = threading.Lock()
_running: set[threading.Event] = set()  # the stop events of the jobs running now


def _handle_watching(job: Any, stop: threading.Event) -> dict:
    with _one_job_at_a_time:
        if stop.is_set():  # stopped while it waited for its turn: nothing was started
            return error_response(stopping.JobStopped("stopped before it started"))
        _running.add(stop)
        if stopping.shutting_down():  # SIGTERM came after the check above, before this job's event was listed
            stop.set()
        try:
            with stopping.watching(stop):
                return handler(job)
        finally:
            _running.discard(stop)


def _stop_running_jobs_on_sigterm() -> None:
    """Chain onto runpod's SIGTERM handler (installed before the first job): a worker being shut
    down asks its running job to stop and save too, instead of training on until it is killed."""
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "stops_jobs", False) or threading.current_thread() is not threading.main_thread():
        return

    def stop_then_previous(signum: int, frame: Any) -> None:
        stopping.request_shutdown()  # before the events: a stop seen now says it was the shutdown
        for event in list(_running):
            event.set()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    stop_then_previous.stops_jobs = True  # type: ignore[attr-defined]
    stop_then_previous.previous = previous  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, stop_then_previous)


def _worker_shutting_down() -> bool:
    """Whether SIGTERM came: through the chain above, or (before any job chained onto it) to runpod's
    scaler, whose SIGTERM handler is its own bound method and which then says it is not alive."""
    if stopping.shutting_down():
        return True
    on_sigterm = signal.getsignal(signal.SIGTERM)
    scaler = getattr(getattr(on_sigterm, "previous", on_sigterm), "__self__", None)
    is_alive = getattr(scaler, "is_alive", None)
    return callable(is_alive) and not is_alive()


def _job_id(job: Any) -> object:
    return job.get("id") if isinstance(job, dict) else None


def _answer_jobs_taken_after_sigterm() -> None:
    """runpod's scaler stops reading its job queue about 0.1 s after SIGTERM, so a job that a
    job-take already under way hands out later would be taken and never answered. Its job fetcher
    (read when the scaler is made) is wrapped: such a job is answered at once, not started."""
    from runpod.serverless.modules import rp_job, rp_scale

    take = rp_scale.get_job

    async def take_or_answer(session: Any, count: int = 1) -> list | None:
        jobs = await take(session, count)
        if jobs and _worker_shutting_down():
            for job in jobs:
                await rp_job.handle_job(session, {"handler": async_handler}, job)
            return []
        return jobs

    rp_scale.get_job = take_or_answer


def main() -> None:
    """Start the worker; runpod reads ``--test_input`` / ``--rp_serve_api`` from the command line."""
    settings.check_all()  # a misconfigured worker stops here, naming the variable, before any job
    level = settings.LOG_LEVEL.get()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # basicConfig does nothing once something configured the root logger (runpod does): set ours.
    logging.getLogger("fastbackend").setLevel(level)
    from runpod.serverless.modules.rp_logger import RunPodLogger

    if not settings.runpod_log_level_set():
        # The SDK logs whole job inputs and outputs at DEBUG, its default: base64 photos and
        # LoRA chunks would fill the log. `--rp_log_level DEBUG` still turns them on.
        RunPodLogger().set_level("INFO")
    # And at INFO `--test_input` prints the whole answer: no base64 in any line, whatever the level.
    logs.shorten_in_runpod_logger(RunPodLogger())
    logs.shorten_in_handlers(logging.getLogger())
    _answer_jobs_taken_after_sigterm()
    runpod.serverless.start({"handler": async_handler})


if __name__ == "__main__":
    main()
