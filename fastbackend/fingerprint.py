"""What a dataset holds, as one sha256 that a client computes over a folder of photos and the worker
over a dataset on its volume, so that a training request can say which photos it must train on.

Standard library only: the client imports it on a laptop (any OS) without the worker's modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

AUTO = "auto"  # a caption that asks the worker to write one: it counts as none


def content_sha256(photos: Iterable[tuple[str, str | None]]) -> str:
    """The sha256 of the sorted lines ``<photo sha256> <caption>`` of (photo sha256, user caption)
    pairs. Equal photos count once, with the first one's caption (an upload keeps the first of
    equal photos and skips the rest); a caption the worker wrote itself, or "auto", counts as none."""
    captions: dict[str, str] = {}
    for sha256, caption in photos:
        text = (caption or "").strip()
        captions.setdefault(sha256, "" if text == AUTO else text)
    lines = sorted(f"{sha256} {caption}\n" for sha256, caption in captions.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()
