"""A job's stop request (RunPod's ``/cancel`` and execution timeout, or the worker's shutdown), seen
by long work between steps.

RunPod stops a job by cancelling its asyncio task, and a worker it scales down by SIGTERM. The
work itself runs in a thread, so that the event loop stays free to hear the signal, and a thread
cannot be cancelled: the async handler sets the job's stop event instead (``watching``), and long
work asks ``requested()`` at points where stopping loses nothing: training after a step (it saves
a resumable state first), an upload between chunks (its staging folder goes, nothing was committed),
caching between images, a report between photos, a render between steps, a model's load between
its components, files and tensors (``stoppable_load``). A hub download runs in a child process that
is ended (``hub_fetch``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from fastbackend.errors import ErrorCode, FastBackendError

# The running job's stop event; asyncio.to_thread copies it into the job's thread.
_current: ContextVar[threading.Event | None] = ContextVar("fastbackend_stop", default=None)
# Set on SIGTERM (and runpod's shutdown, SIGINT included): the worker is going away. A stop then
# is told apart from a cancel or a timeout, which RunPod sends the same way (the worker cannot tell
# those two apart). A plain flag, not an Event: a signal handler must take no lock the interrupted
# code may hold.
_shutting_down = False
SHUTDOWN = "shutdown"
CANCEL_OR_TIMEOUT = "cancel_or_timeout"
CAUSES = {SHUTDOWN: "the worker shutting down", CANCEL_OR_TIMEOUT: "a cancel or the execution timeout"}


class JobStopped(FastBackendError):
    """A stopped job's answer: what stopped it (``stopped_by``) and what to do (``resend``) ride in
    its output, beside the message."""

    code = ErrorCode.STOPPED

    def __init__(self, message: str, resend: str = "send the same request again"):
        super().__init__(message)
        self.extra = {"stopped_by": cause(), "resend": resend}


def request_shutdown() -> None:
    global _shutting_down
    _shutting_down = True


def shutting_down() -> bool:
    return _shutting_down


def cause() -> str:
    """Why work stops now: ``shutdown`` or ``cancel_or_timeout``."""
    return SHUTDOWN if _shutting_down else CANCEL_OR_TIMEOUT


@contextlib.contextmanager
def watching(event: threading.Event) -> Iterator[None]:
    """Make ``event`` the stop request of the work done inside the block (in this context)."""
    token = _current.set(event)
    try:
        yield
    finally:
        _current.reset(token)


def requested() -> bool:
    event = _current.get()
    return event is not None and event.is_set()


def this_jobs_request() -> Callable[[], bool]:
    """``requested`` for the job running in this thread, readable from any thread (a library's
    worker threads, a watcher)."""
    event = _current.get()
    return lambda: event is not None and event.is_set()


def cause_in_words() -> str:
    return CAUSES[cause()]


def stop_if_requested(what: str) -> None:
    stop_check(what)()


def stop_check(
    phase: str, should_stop: Callable[[], bool] | None = None, resend: str = "send the same request again"
) -> Callable[[], None]:
    """A check for work to call between its units (an image, a photo, a step), from any thread: it
    raises ``JobStopped`` naming ``phase`` (and what to do: ``resend``) once ``should_stop()`` (by
    default: this job's stop request) says so."""
    should_stop = should_stop or this_jobs_request()

    def check() -> None:
        if should_stop():
            raise JobStopped(f"{phase} stopped by {cause_in_words()}", resend)

    return check


# The model load running in this thread: its stop check, which the loaders' own steps call
# (``check_load``; ``training.families.base`` hooks it into diffusers' per-component, per-file and
# per-tensor steps). A from_pretrained offers no other place to stop, and a FLUX load reads for a
# minute from a network volume.
_load_check: ContextVar[Callable[[], None] | None] = ContextVar("fastbackend_load_check", default=None)


@contextlib.contextmanager
def stoppable_load(phase: str, should_stop: Callable[[], bool] | None = None) -> Iterator[None]:
    """Make ``check_load`` stop the load inside the block, naming ``phase``, once ``should_stop()``
    (by default this job's stop request) says so. Loads write nothing: stopping one loses nothing."""
    token = _load_check.set(stop_check(phase, should_stop))
    try:
        yield
    finally:
        _load_check.reset(token)


def check_load() -> None:
    """Called by the loaders between their steps: stops the load of this thread when asked."""
    check = _load_check.get()
    if check is not None:
        check()
