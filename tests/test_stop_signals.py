"""RunPod's cancel and execution timeout: a stop signal through runpod's own ``JobScaler``.

The scaler is runpod's real one (its job loop, its stop-signal loop, its ``handle_job``); only
the two network fetchers are replaced, as its config allows outside RunPod, and the result
sender is captured instead of posted.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.photos import b64, nine_photos
from tests.training_helpers import install_model, train, upload_photos, user_yaml

MODEL = "nowy_dataset_1.3"  # the name in the user's YAML


def captured_results(monkeypatch) -> list[tuple[str, dict]]:
    """What runpod's job code posts back, (job id, result), captured instead of posted."""
    from runpod.serverless.modules import rp_job

    posted: list[tuple[str, dict]] = []

    async def capture(session, job_data, job, is_stream=False):
        posted.append((job["id"], job_data))

    monkeypatch.setattr(rp_job, "send_result", capture)
    return posted


def run_scaler(jobs: list[dict], stop_when, monkeypatch) -> list[tuple[str, dict]]:
    """Feed ``jobs`` one at a time to a JobScaler running ``async_handler``; send each job id
    ``stop_when(job_id)`` says to stop (once). Returns what runpod would have posted back."""
    from runpod.serverless.modules import rp_scale

    import handler_fast

    posted = captured_results(monkeypatch)
    pending = list(jobs)
    stopped: set[str] = set()

    async def jobs_fetcher(session, count):
        await asyncio.sleep(0.05)
        if pending:
            return [pending.pop(0)]
        if len(posted) + len(stopped) == len(jobs):
            scaler.kill_worker()
        return []

    async def stop_signals_fetcher(session):
        await asyncio.sleep(0.05)
        for job in jobs:
            if job["id"] not in stopped and stop_when(job["id"]):
                stopped.add(job["id"])
                return ["no-such-job", job["id"]]  # an id the worker does not run is ignored
        return []

    scaler = rp_scale.JobScaler(
        {
            "handler": handler_fast.async_handler,
            "jobs_fetcher": jobs_fetcher,
            "stop_signals_fetcher": stop_signals_fetcher,
            "jobs_fetcher_timeout": 5,
            "stop_signals_fetcher_timeout": 5,
        }
    )
    asyncio.run(asyncio.wait_for(scaler.run(), timeout=240))
    return posted


@pytest.mark.slow
def test_a_stop_signal_ends_training_within_a_step_saves_it_and_frees_the_worker(tiny_models, data_root, monkeypatch):
    from fastbackend.layout import LoraFolder
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    steps_done: list[int] = []
    real_report = trainer.report_step

    def report(run, hooks, loss, seconds, bar):
        steps_done.append(run.step)
        time.sleep(0.05)  # a step of a real size: the signal arrives while one is running
        real_report(run, hooks, loss, seconds, bar)

    monkeypatch.setattr(trainer, "report_step", report)
    signalled_at: list[int] = []

    def stop_when(job_id: str) -> bool:
        if job_id == "train-1" and len(steps_done) >= 3:
            signalled_at.append(steps_done[-1])
            return True
        return False

    long_run = user_yaml(model_path, steps=200)  # long enough to stop; short enough to fail, not hang, if it never does
    jobs = [
        {"id": "train-1", "input": {"type": "train_with_yaml", "yaml_config": long_run}},
        {"id": "health-1", "input": {"type": "health"}},
    ]
    posted = run_scaler(jobs, stop_when, monkeypatch)

    assert [job_id for job_id, _ in posted] == ["health-1"]  # the stopped job posts nothing; the next one ran
    assert posted[0][1]["output"]["status"] == "healthy"
    last = steps_done[-1]
    assert last - signalled_at[0] <= 1  # the step in flight when the signal came, no more
    folder = LoraFolder(data_root / "output" / MODEL)
    assert [step for step in range(1, last + 1) if folder.step_save(step).is_file()] == [last]
    assert folder.state.is_file() and not folder.final_lora.exists()

    again = train(user_yaml(model_path, steps=last + 2))
    assert again["status"] == "success", again
    assert (again["resumed_from_step"], again["steps"]) == (last, last + 2)


def test_a_stopped_upload_leaves_nothing_and_the_worker_answers_the_next_job(data_root, monkeypatch):
    from fastbackend import staging

    writing = threading.Event()
    real_write = staging.StagedFile.write

    def slow_write(self, chunk):
        writing.set()
        time.sleep(0.2)
        real_write(self, chunk)

    monkeypatch.setattr(staging.StagedFile, "write", slow_write)
    files = [{"filename": name, "content": b64(data)} for name, data, _ in nine_photos()]
    jobs = [
        {"id": "upload-1", "input": {"type": "upload_training_data", "training_name": "matt", "files": files}},
        {"id": "health-1", "input": {"type": "health"}},
    ]
    posted = run_scaler(jobs, lambda job_id: job_id == "upload-1" and writing.is_set(), monkeypatch)
    assert [job_id for job_id, _ in posted] == ["health-1"]
    training_data = data_root / "training_data"
    assert not training_data.exists() or list(training_data.iterdir()) == []


def test_the_stop_check_itself_refuses_to_continue_once_asked(data_root):
    """The flag the handler sets is the one the work sees, in the work's own thread."""
    from fastbackend import stopping

    event = threading.Event()
    seen = []

    def work():
        with stopping.watching(event):
            seen.append(stopping.requested())
            event.set()
            with pytest.raises(stopping.JobStopped, match="the upload was stopped by a cancel"):
                stopping.stop_if_requested("the upload was")
            seen.append(stopping.requested())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [False, True] and not stopping.requested()  # outside the block, nothing is asked


def test_local_modes_still_answer_through_the_async_handler():
    import handler_fast

    answer = asyncio.run(handler_fast.async_handler({"id": "x", "input": {"type": "health"}}))
    assert answer["status"] == "healthy"


def test_jobs_run_one_at_a_time_whoever_starts_them(monkeypatch):
    """runpod's local server runs jobs concurrently: two models must not train side by side."""
    import handler_fast

    spans = []

    def slow(job):
        started = time.monotonic()
        time.sleep(0.2)
        spans.append((started, time.monotonic()))
        return {"status": "success"}

    monkeypatch.setattr(handler_fast, "handler", slow)

    async def two_at_once():
        jobs = [handler_fast.async_handler({"id": name, "input": {}}) for name in ("a", "b")]
        return await asyncio.gather(*jobs)

    assert [answer["status"] for answer in asyncio.run(two_at_once())] == ["success", "success"]
    (_, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end


def test_sigterm_asks_the_running_job_to_stop_then_runs_runpods_own_handler(monkeypatch):
    import signal

    import handler_fast

    runpods = []
    installed = {}
    monkeypatch.setattr(signal, "getsignal", lambda signum: lambda number, frame: runpods.append(number))
    monkeypatch.setattr(signal, "signal", lambda signum, function: installed.setdefault(signum, function))
    handler_fast._stop_running_jobs_on_sigterm()
    running = threading.Event()
    handler_fast._running.add(running)
    try:
        installed[signal.SIGTERM](signal.SIGTERM, None)
    finally:
        handler_fast._running.discard(running)
    assert running.is_set() and runpods == [signal.SIGTERM]


@pytest.mark.slow
def test_a_stop_during_sampling_ends_the_round_and_saves_the_step(tiny_models, data_root, monkeypatch):
    from fastbackend.api.train import train_with_yaml
    from fastbackend.errors import FastBackendError
    from fastbackend.layout import LoraFolder
    from fastbackend.schemas import TrainWithYamlRequest
    from fastbackend.stopping import watching
    from fastbackend.training import sampling

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    event = threading.Event()
    real_save = sampling.save_image

    def stop_after_first_image(image, path):
        event.set()  # the signal arrives while the first sample is being made
        return real_save(image, path)

    monkeypatch.setattr(sampling, "save_image", stop_after_first_image)
    yaml_text = user_yaml(model_path, steps=50, replacements={"sample_every: 100": "sample_every: 1"})
    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config=yaml_text)
    with (
        watching(event),
        pytest.raises(FastBackendError, match="stopped by a cancel or the execution timeout at step 1"),
    ):
        train_with_yaml(request)
    folder = LoraFolder(data_root / "output" / MODEL)
    assert len(list(folder.samples.glob("*"))) == 1  # the round ended after its first image
    assert folder.step_save(1).is_file() and folder.state.is_file()


def run_scaler_until_sigterm(first: list[dict], after_sigterm: list[dict], monkeypatch, send_sigterm=None):
    """runpod's JobScaler with its own SIGTERM handler installed (as ``JobScaler.start`` does), ``first``
    handed out one at a time; then a job-take in flight when SIGTERM comes hands out ``after_sigterm``.
    SIGTERM is a real signal to this process: sent once the first jobs are done, or by ``send_sigterm``."""
    import os
    import signal

    from runpod.serverless.modules import rp_scale

    import handler_fast

    posted = captured_results(monkeypatch)
    pending = list(first)

    async def jobs_fetcher(session, count):
        await asyncio.sleep(0.05)
        if pending:
            return [pending.pop(0)]
        if send_sigterm is None and len(posted) == len(first):
            os.kill(os.getpid(), signal.SIGTERM)  # the worker is idle, this take is in flight
        for _ in range(100):
            if not scaler.is_alive():
                return list(after_sigterm)  # handed out after the signal: the scaler still runs them
            await asyncio.sleep(0.05)
        return []

    async def no_stop_signals(session):
        await asyncio.sleep(0.05)
        return []

    scaler = rp_scale.JobScaler(
        {
            "handler": handler_fast.async_handler,
            "jobs_fetcher": jobs_fetcher,
            "stop_signals_fetcher": no_stop_signals,
            "jobs_fetcher_timeout": 10,
            "stop_signals_fetcher_timeout": 5,
        }
    )
    before = signal.signal(signal.SIGTERM, scaler.handle_shutdown)
    try:
        asyncio.run(asyncio.wait_for(scaler.run(), timeout=240))
    finally:
        signal.signal(signal.SIGTERM, before)
    return posted


@pytest.mark.parametrize("jobs_before", [0, 1])
def test_no_job_starts_after_sigterm_it_is_answered_at_once_as_a_shutdown(jobs_before, monkeypatch):
    """With no job before, only runpod's own SIGTERM handler is installed; with one, the worker's chain."""
    first = [{"id": "health-0", "input": {"type": "health"}}] * jobs_before
    late = {"id": "health-late", "input": {"type": "health"}}
    started = time.monotonic()
    posted = run_scaler_until_sigterm(first, [late], monkeypatch)
    assert [job_id for job_id, _ in posted] == ["health-0"] * jobs_before + ["health-late"]
    answer = posted[-1][1]
    assert answer["error"] == "the worker is shutting down and starts no new job; send it again"
    assert answer["output"]["error_code"] == "stopped" and answer["output"]["stopped_by"] == "shutdown"
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_sigterm_mid_training_saves_and_the_answer_says_the_shutdown_stopped_it(tiny_models, data_root, monkeypatch):
    import os
    import signal

    from fastbackend.layout import LoraFolder
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    real_report = trainer.report_step

    def report_then_sigterm(run, hooks, loss, seconds, bar):
        real_report(run, hooks, loss, seconds, bar)
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # RunPod scales the worker down mid-run
        time.sleep(0.05)

    monkeypatch.setattr(trainer, "report_step", report_then_sigterm)
    train_job = {"id": "train-1", "input": {"type": "train_with_yaml", "yaml_config": user_yaml(model_path, steps=200)}}
    posted = run_scaler_until_sigterm([train_job], [], monkeypatch, send_sigterm="from the run")
    ((job_id, stopped),) = posted  # runpod posts what the stopped job answered: it was not cancelled
    assert job_id == "train-1"
    assert stopped["error"].startswith("training stopped by the worker shutting down at step ")
    step = int(stopped["error"].split("at step ")[1].split(":")[0])
    assert 3 <= step <= 4  # the step in flight, no more
    assert stopped["output"]["stopped_by"] == "shutdown"
    assert stopped["output"]["resend"] == f"send the same train_with_yaml again: it resumes from step {step}"
    assert LoraFolder(data_root / "output" / MODEL).state.is_file()


def test_a_job_a_take_hands_out_well_after_sigterm_is_still_answered(monkeypatch):
    """runpod's scaler stops reading its queue about 0.1 s after SIGTERM; a job-take under way that
    answers later still gets its job answered (not started), through the worker's wrapped fetcher."""
    import os
    import signal

    from runpod.serverless.modules import rp_scale

    import handler_fast

    posted = captured_results(monkeypatch)

    async def take(session, count=1):
        if not posted and not taken:
            taken.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the worker is idle, this take is under way
            await asyncio.sleep(0.5)  # the scaler's job loop has ended meanwhile
            return [{"id": "late", "input": {"type": "health"}}]
        return []

    taken: list[int] = []
    monkeypatch.setattr(rp_scale, "get_job", take)
    handler_fast._answer_jobs_taken_after_sigterm()
    scaler = rp_scale.JobScaler({"handler": handler_fast.async_handler})
    before = signal.signal(signal.SIGTERM, scaler.handle_shutdown)
    try:
        asyncio.run(asyncio.wait_for(scaler.run(), timeout=60))
    finally:
        signal.signal(signal.SIGTERM, before)
    ((job_id, answer),) = posted
    assert job_id == "late" and answer["output"]["stopped_by"] == "shutdown"
