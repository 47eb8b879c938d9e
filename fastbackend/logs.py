"""Logs never carry file contents: runs of base64 are shortened, whoever writes the line.

A LoRA chunk from ``download_model``, a sample from ``get_samples`` or a photo in a job input
is base64 in a JSON answer; runpod's SDK prints whole answers in some modes (``--test_input``
prints "Job result: ..."). Both the SDK's logger and the worker's log handlers pass through here.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# 120 or more characters of base64 (standard or URL-safe), line breaks allowed among them as
# they come or as a logged dict escapes them: longer than any hash (64 hex) the worker logs.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\\\r\n-]{120,}={0,2}")  # one class: linear time on a 20 MB line
# Encoded bytes mix cases and digits; a long name or path made of words rarely does all three.
MIXED = (re.compile(r"[a-z]"), re.compile(r"[A-Z]"), re.compile(r"[0-9]"))


def shorten_base64(text: str) -> str:
    return BASE64_RUN.sub(_shortened, text)


def _shortened(match: re.Match[str]) -> str:
    run = match.group()
    if not all(kind.search(run) for kind in MIXED):
        return run
    return f"<{len(run)} base64 characters>"


class ShortenBase64(logging.Filter):
    """A handler filter that rewrites each record's message with ``shorten_base64``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: logging reports that itself
            return True
        record.msg, record.args = shorten_base64(message), None
        return True


def shorten_in_handlers(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if not any(isinstance(f, ShortenBase64) for f in handler.filters):
            handler.addFilter(ShortenBase64())


def shorten_in_runpod_logger(runpod_logger: Any) -> None:
    """Route runpod's own logger (a singleton with one ``log`` method under all levels) through here."""
    original = type(runpod_logger).log

    def log(message: object, message_level: str = "INFO", job_id: str | None = None) -> None:
        original(runpod_logger, shorten_base64(str(message)), message_level, job_id)

    runpod_logger.log = log
