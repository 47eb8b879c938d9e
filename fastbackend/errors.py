"""Errors every layer raises, their stable codes, and the one shape they take in a job's answer.

A failure answer is ``{"status": "error", "error": str, "error_code": str, "details": [str],
"timestamp": str}``. ``error`` is always one line of text: RunPod marks the job FAILED from a
top-level ``error`` key and mishandles anything but a string there. ``error_code`` is one of
``ErrorCode``; the README lists exactly these (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

MAX_SHOWN_VALUE_CHARS = 80


class ErrorCode(StrEnum):
    """Stable snake_case codes that clients branch on."""

    INVALID_REQUEST = "invalid_request"  # the job is not {"input": {...}}
    UNKNOWN_TYPE = "unknown_type"
    VALIDATION_ERROR = "validation_error"  # a request field is missing, mistyped or out of bounds
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NOT_FOUND = "not_found"
    INVALID_NAME = "invalid_name"
    PATH_OUTSIDE_ROOT = "path_outside_root"
    LOCKED = "locked"
    INVALID_UPLOAD = "invalid_upload"
    INVALID_CONFIG = "invalid_config"
    INVALID_DATASET = "invalid_dataset"
    # A training request's `datasets` names photos this worker's volume does not hold, and brings none.
    DATASET_MISMATCH = "dataset_mismatch"
    MODEL_LOAD_FAILED = "model_load_failed"
    NON_FINITE_LOSS = "non_finite_loss"
    UNKNOWN_LORA = "unknown_lora"
    RESULT_TOO_LARGE = "result_too_large"
    OUT_OF_MEMORY = "out_of_memory"
    GPU_UNAVAILABLE = "gpu_unavailable"  # on RunPod: no GPU torch can use (a host driver too old for its CUDA build)
    DISK_FULL = "disk_full"
    UPLOAD_FAILED = "upload_failed"  # the bucket refused or could not be reached; the file stays on the volume
    STOPPED = "stopped"  # a cancel or the execution timeout; the job's resumable state is kept
    INTERNAL_ERROR = "internal_error"


class FastBackendError(Exception):
    """An expected failure: bad input, a missing dataset, a payload that is too large.

    ``code`` says what kind (subclasses fix it; plain raises must pass one); ``details`` lists
    every problem found (the message repeats the first one, or summarises them).
    """

    code: ErrorCode
    # More fields for the failure answer (a stopped job's cause); an instance sets its own, never mutates this.
    extra: dict[str, object] = {}  # noqa: RUF012

    def __init__(self, message: str, details: list[str] | None = None, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details) if details else [message]
        if code is not None:
            self.code = code
        if not isinstance(getattr(self, "code", None), ErrorCode):
            raise TypeError(f"{type(self).__name__} needs an ErrorCode, got {getattr(self, 'code', None)!r}")


class ValidationFailed(FastBackendError):
    code = ErrorCode.VALIDATION_ERROR

    @classmethod
    def from_problems(cls, problems: list[str], code: ErrorCode | None = None) -> ValidationFailed:
        """One error carrying every problem; its message is the first plus a count of the rest."""
        message = problems[0]
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem(s), see details)"
        return cls(message, problems, code=code)


class NotFound(FastBackendError):
    code = ErrorCode.NOT_FOUND


class PayloadTooLarge(FastBackendError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


def show_value(value: object) -> str:
    """A short, safe rendering of a bad value for an error message.

    Long strings (base64 payloads, pasted files) are never echoed: only their length is.
    """
    if isinstance(value, str) and len(value) > MAX_SHOWN_VALUE_CHARS:
        return f"<string of {len(value)} characters>"
    text = repr(value)
    if len(text) > MAX_SHOWN_VALUE_CHARS:
        return f"<{type(value).__name__} of {len(text)} characters>"
    return text


def error_response(error: FastBackendError) -> dict:
    """The failure answer for ``error``; ``error`` stays one line."""
    return error.extra | {
        "status": "error",
        "error": " ".join(error.message.split()),
        "error_code": error.code.value,
        "details": error.details,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
