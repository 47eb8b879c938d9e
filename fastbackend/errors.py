"""Errors every layer raises, and the one shape they take in a job's answer.

A failure answer is ``{"status": "error", "error": str, "error_code": str, "details": [str],
"timestamp": str}``. ``error`` is always one line of text: RunPod marks the job FAILED from a
top-level ``error`` key and mishandles anything but a string there.
"""

from __future__ import annotations

from datetime import datetime, timezone

MAX_SHOWN_VALUE_CHARS = 80


class FastBackendError(Exception):
    """An expected failure: bad input, a missing dataset, a payload that is too large.

    ``code`` is stable snake_case for clients to branch on; ``details`` lists every problem
    found (the message repeats the first one, or summarises them).
    """

    code = "bad_request"

    def __init__(self, message: str, details: list[str] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details) if details else [message]
        if code is not None:
            self.code = code


class ValidationFailed(FastBackendError):
    code = "validation_error"

    @classmethod
    def from_problems(cls, problems: list[str], code: str | None = None) -> "ValidationFailed":
        """One error carrying every problem; its message is the first plus a count of the rest."""
        message = problems[0]
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem(s), see details)"
        return cls(message, problems, code=code)


class NotFound(FastBackendError):
    code = "not_found"


class PayloadTooLarge(FastBackendError):
    code = "payload_too_large"


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
    return {
        "status": "error",
        "error": " ".join(error.message.split()),
        "error_code": error.code,
        "details": error.details,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
