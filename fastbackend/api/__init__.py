"""Request modules: one function per request type, the only targets of ``handler_fast``'s table.

Each takes its validated request (``schemas``) and a ``progress`` callback, calls the core
(storage, datasets, training) and shapes the answer, a dict with ``"status": "success"``.
Only ``generate`` imports torch at module level (``train`` when a run starts): every other
request type answers without it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastbackend.errors import ErrorCode, FastBackendError

Progress = Callable[[dict], None]
# RunPod refuses results over 10 MB on /run; leave room for the other fields.
MAX_RESULT_BYTES = 9_500_000


def check_result_size(images: list[dict], what: str, advice: str) -> None:
    """Refuse base64 images that together would break RunPod's result limit."""
    size = sum(len(image["content"]) for image in images)
    if size > MAX_RESULT_BYTES:
        raise FastBackendError(
            f"output: {size:,} bytes of {what} is over RunPod's {MAX_RESULT_BYTES:,}-byte result limit; {advice}",
            code=ErrorCode.RESULT_TOO_LARGE,
        )
