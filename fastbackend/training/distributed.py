"""Every GPU of a worker: data-parallel training, one process per GPU.

``train(job, hooks)`` is how the API trains. With one process (one GPU, or the CPU) the run goes
on in this process, exactly as ``trainer.train``. With more (``FASTBACKEND_PROCESSES``, else the
visible GPUs) it spawns them: accelerate starts their process group from the environment set here
(NCCL on GPUs, gloo on the CPU); each process draws its own batches, so a step trains
``batch_size`` examples per process; the LoRA's gradients are averaged before every optimizer
update (``Run.average_gradients``), so every process holds the same LoRA; the main process saves,
samples and reports through a queue; a stop request reaches all of them through an event, and they
agree on the step to stop at (``Run.agreed_stop``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import socket
import traceback
from typing import Any

import torch

from fastbackend import settings
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.training import trainer
from fastbackend.training.run import Hooks, TrainJob, TrainResult

log = logging.getLogger("fastbackend.trainer")
POLL_S = 0.5
EXIT_WAIT_S = 30.0


def process_count(device: str) -> int:
    """``FASTBACKEND_PROCESSES``, else one per visible GPU when training on CUDA, else 1."""
    configured = settings.PROCESSES.get()
    if configured is not None:
        return configured
    if device.startswith("cuda") and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def train(job: TrainJob, hooks: Hooks) -> tuple[TrainResult, int]:
    """Train ``job`` in as many processes as there are GPUs; (the result, the process count)."""
    count = process_count(job.config.process.device)
    if count == 1:
        return trainer.train(job, hooks), 1
    return train_across(job, hooks, count), count


def train_across(job: TrainJob, hooks: Hooks, count: int) -> TrainResult:
    """Spawn ``count`` training processes and relay the main one's reports until it answers."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no CUDA state forked
    events: Any = context.Queue()
    stop = context.Event()
    port = free_port()
    processes = [
        context.Process(target=run_process, args=(rank, count, port, job, events, stop), daemon=True)
        for rank in range(count)
    ]
    for process in processes:
        process.start()
    try:
        return relay(events, processes, hooks, stop)
    finally:
        stop.set()  # whatever happened, no process keeps training
        for process in processes:
            process.join(EXIT_WAIT_S)
            if process.is_alive():
                process.terminate()


def relay(events, processes: list, hooks: Hooks, stop) -> TrainResult:
    """Pass the main process's reports on, and the caller's stop request down, until a result."""
    while True:
        if hooks.should_stop():
            stop.set()
        try:
            kind, payload = events.get(timeout=POLL_S)
        except queue.Empty:
            failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if failed:
                rank, code = failed[0]
                raise FastBackendError(
                    f"training process {rank} of {len(processes)} ended with exit code {code} (killed, or out of "
                    "memory); a resumable state, if any, is kept",
                    code=ErrorCode.INTERNAL_ERROR,
                ) from None
            continue
        if kind == "step":
            hooks.on_step(payload)
        elif kind == "stage":
            hooks.on_stage(payload)
        elif kind == "result":
            return payload
        else:  # "error": the first process to fail says why
            message, details, code = payload
            raise FastBackendError(message, details=details, code=ErrorCode(code))


def run_process(rank: int, count: int, port: int, job: TrainJob, events, stop) -> None:
    """One training process: its GPU, its part of the process group, its reports."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    logging.basicConfig(level=settings.LOG_LEVEL.get(), format=f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    process = job.config.process
    if process.device.startswith("cuda"):
        process.device = f"cuda:{rank}"
    main = rank == 0
    hooks = Hooks(
        on_step=lambda info: events.put(("step", info)) if main else None,
        on_stage=lambda info: events.put(("stage", info)) if main else None,
        should_stop=stop.is_set,
    )
    try:
        result = trainer.train(job, hooks)
        if main:
            events.put(("result", result))
    except FastBackendError as exc:
        events.put(("error", (exc.message, exc.details, str(exc.code))))
    except torch.cuda.OutOfMemoryError:
        events.put(("error", (f"training process {rank} ran out of GPU memory", None, str(ErrorCode.OUT_OF_MEMORY))))
    except BaseException as exc:
        log.error("training process %d failed:\n%s", rank, traceback.format_exc())
        message = f"training process {rank} failed: {type(exc).__name__}: {str(exc)[:200]}"
        events.put(("error", (message, None, str(ErrorCode.INTERNAL_ERROR))))


def free_port() -> int:
    """A free local TCP port for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
