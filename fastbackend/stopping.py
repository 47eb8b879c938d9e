"""A job's stop request (RunPod's ``/cancel`` and execution timeout, or the worker's shutdown), seen
by long work between steps.

RunPod stops a job by cancelling its asyncio task, and a worker it scales down by SIGTERM. The
work itself runs in a thread, so that the event loop stays free to hear the signal, and a thread
cannot be cancelled: the async handler sets the job's stop event instead (``watching``), and long
work asks ``requested()`` at points where stopping loses nothing: training after a step (it saves
a resumable state first), an upload between chunks (its staging folder goes, nothing was committed),
caching between images, a report between photos, a render between steps. A hub download runs in a
child process that is ended (``hub_fetch``). A model's ``from_pretrained`` offers no such point and
reads for a minute from a network volume: it runs ``interruptible``, ended from outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import TracebackType

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
    if requested():
        raise JobStopped(f"{what} stopped by {cause_in_words()}")


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


INTERRUPT_POLL_S = 0.2


class _Interrupted(BaseException):
    """Raised inside a thread by ``interruptible``'s watcher; a BaseException, so that the libraries'
    ``except Exception`` (a loader trying another format) let it through."""


class interruptible:
    """Run a block that has nowhere to check for a stop (a model's ``from_pretrained``) so that a stop
    ends it within ``INTERRUPT_POLL_S``: a watcher thread raises inside the block's thread, as Ctrl-C
    does in a notebook, and the block ends with ``JobStopped`` naming ``phase``.

    Only for blocks that write nothing (what is half-built is garbage, never a file). The exception
    can land only inside the block or its exit, never after: the exit disarms the watcher, then
    withdraws an exception still on its way. Python delivers it between bytecodes, so a long call
    into C (one tensor's read) finishes first."""

    def __init__(self, phase: str, should_stop: Callable[[], bool] | None = None):
        self.phase = phase
        self.should_stop = should_stop or this_jobs_request()
        self._lock = threading.Lock()
        self._armed = False
        self._fired = False
        self._done = threading.Event()

    def __enter__(self) -> interruptible:
        self._target = threading.get_ident()
        self._armed = True
        watcher = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)
        watcher.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(INTERRUPT_POLL_S):
            if self.should_stop():
                with self._lock:
                    if self._armed:
                        _raise_in(self._target, _Interrupted)
                        self._fired = True
                return

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        while True:
            try:
                self._done.set()
                with self._lock:
                    self._armed = False
                if self._fired:
                    _raise_in(self._target, None)  # withdraw it if it has not landed yet
                break
            except _Interrupted:  # it landed here, in the exit: the block's stop all the same
                continue
        if self._fired:
            raise JobStopped(f"{self.phase} stopped by {cause_in_words()}") from None


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Have ``exception`` raised in thread ``thread_id`` at its next bytecode (None: withdraw one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None
    )
