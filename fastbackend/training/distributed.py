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
import random
import socket
import traceback
from typing import Any

import torch

from fastbackend import settings, stopping
from fastbackend.config import PREFIX
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.storage import disk_full, out_of_space
from fastbackend.training import trainer
from fastbackend.training.run import Hooks, TrainingStopped, TrainJob, TrainResult, out_of_memory

log = logging.getLogger("fastbackend.trainer")
POLL_S = 0.5
LOST_AFTER_POLLS = 4  # a queue hands over what an ended process sent within this many polls
EXIT_WAIT_S = 30.0


def process_count(device: str, warnings: list[str]) -> int:
    """``FASTBACKEND_PROCESSES``, else one per visible GPU when training on CUDA, else 1; never
    more processes than GPUs on CUDA (one would train on the CPU, and every step would wait for it)."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") and torch.cuda.is_available() else 0
    configured = settings.PROCESSES.get()
    if configured is None:
        return max(1, gpus)
    if gpus and configured > gpus:
        warnings.append(f"FASTBACKEND_PROCESSES={configured}: only {gpus} GPU(s) here; training in {gpus} processes")
        return gpus
    return configured


def train(job: TrainJob, hooks: Hooks) -> tuple[TrainResult, int]:
    """Train ``job`` in as many processes as there are GPUs; (the result, the process count)."""
    count = process_count(job.config.process.device, job.warnings)
    if count == 1:
        return trainer.train(job, hooks), 1
    train_cfg = job.config.process.train
    if train_cfg.seed is None and job.config.process.training_seed is None:
        # One seed for all: every process must start from the same LoRA weights.
        train_cfg.seed = random.SystemRandom().randrange(2**31)
        job.warnings.append(f"{PREFIX}.train.seed: none set; {count} processes share the seed {train_cfg.seed}")
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
    quiet = 0  # polls with every process ended and nothing left to read
    while True:
        if hooks.should_stop():
            stop.set()
        try:
            kind, payload = events.get(timeout=POLL_S)
        except queue.Empty:
            quiet = quiet + 1 if all(p.exitcode == 0 for p in processes) else 0
            check_alive(processes, lost=quiet > LOST_AFTER_POLLS)
            continue
        if kind == "step":
            hooks.on_step(payload)
        elif kind == "stage":
            hooks.on_stage(payload)
        elif kind == "result":
            return payload
        else:  # "error": the first process to fail says why
            message, details, code, extra = payload
            if code == ErrorCode.STOPPED:
                raise stopped_here(message, extra)
            raise FastBackendError(message, details=details, code=ErrorCode(code))


def stopped_here(message: str, extra: dict) -> TrainingStopped:
    """A training process's stop, said with what the worker's own process knows: only it hears
    SIGTERM, so only it can tell a shutdown from a cancel or a timeout."""
    said = stopping.CAUSES[stopping.CANCEL_OR_TIMEOUT]
    return TrainingStopped(
        message.replace(said, stopping.cause_in_words()), resend=str(extra.get("resend", "send it again"))
    )


def check_alive(processes: list, lost: bool) -> None:
    """Raise when a process died, or when all ended and none answered (``lost``: the result did not
    arrive, e.g. it could not be sent)."""
    failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
    if not (failed or lost):
        return
    rank, code = failed[0] if failed else (0, 0)
    how = f"ended with exit code {code} (killed, or out of memory)" if failed else "ended without an answer"
    raise FastBackendError(
        f"training process {rank} of {len(processes)} {how}; a resumable state, if any, is kept",
        code=ErrorCode.INTERNAL_ERROR,
    )


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
    try:
        result = trainer.train(job, process_hooks(main, events, stop, os.getppid()))
        if main:
            events.put(("result", result))
    except BaseException as exc:
        if isinstance(exc, TrainingStopped) and not main:  # all stop at one step; the main one says so
            return
        error = as_answer(exc, rank)
        events.put(("error", (error.message, error.details, str(error.code), dict(error.extra))))


def process_hooks(main: bool, events, stop, parent: int) -> Hooks:
    """A training process's hooks: the main one reports through ``events``; each stops on the
    ``stop`` event or when its worker (``parent``) is gone, so none trains on as an orphan."""
    return Hooks(
        on_step=lambda info: events.put(("step", info)) if main else None,
        on_stage=lambda info: events.put(("stage", info)) if main else None,
        should_stop=lambda: stop.is_set() or os.getppid() != parent,
    )


def as_answer(exc: BaseException, rank: int) -> FastBackendError:
    """What a training process's failure tells the client (as the worker's own handler would)."""
    if isinstance(exc, FastBackendError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return out_of_memory()
    if out_of_space(exc):
        return disk_full()
    log.error("training process %d failed:\n%s", rank, traceback.format_exc())
    return FastBackendError(
        f"internal error ({type(exc).__name__}) in training process {rank}; see the worker log",
        code=ErrorCode.INTERNAL_ERROR,
    )


def free_port() -> int:
    """A free local TCP port for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
