"""A job's stop request (RunPod's ``/cancel`` and execution timeout), seen by long work between steps.

RunPod stops a job by cancelling its asyncio task. The work itself runs in a thread, so that
the event loop stays free to hear the signal, and a thread cannot be cancelled: the async
handler sets the job's stop event instead (``watching``), and long work asks ``requested()`` at
points where stopping loses nothing: training after a step (it saves a resumable state first),
an upload between chunks (its staging folder goes, nothing was committed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar

from fastbackend.errors import ErrorCode, FastBackendError

# The running job's stop event; asyncio.to_thread copies it into the job's thread.
_current: ContextVar[threading.Event | None] = ContextVar("fastbackend_stop", default=None)


class JobStopped(FastBackendError):
    code = ErrorCode.STOPPED


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


def stop_if_requested(what: str) -> None:
    if requested():
        raise JobStopped(f"{what} stopped by a cancel or the execution timeout")
