"""The last model a request loaded (``generate``'s base pipeline, the upload's captioner), kept
loaded between jobs on a warm worker.

At most one model is kept: loading another drops it, and training drops it first (``release``),
since it needs the GPU memory for its own copy. Callers hold ``lock`` while they use the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from fastbackend import stopping
from fastbackend.hub_fetch import Report
from fastbackend.storage import download_cache_dir
from fastbackend.training.families import Family
from fastbackend.training.families.base import move_to

lock = threading.RLock()
_loaded: dict[str, Any] = {}  # what it was loaded from -> the model; at most one entry
T = TypeVar("T")


def pipeline(family: Family, source: str, field: str, report: Report | None = None):
    """The pipeline of ``source`` on the best device, loaded unless it is the one kept (a hub model
    in no cache is downloaded first, its bytes told to ``report``)."""

    def load():
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda else torch.float32
        pipe = family.load(source, dtype, str(download_cache_dir()), field=field, report=report)
        device, check = "cuda" if cuda else "cpu", stopping.stop_check("moving the base model")
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                move_to(component, device, check)
        return pipe.to(device)

    return kept(source, load)


def kept(key: str, load: Callable[[], T]) -> T:
    """The model kept under ``key``, or ``load()``'s, kept in its place (the one kept before goes first)."""
    with lock:
        if key not in _loaded:
            release()
            _loaded[key] = load()
        return _loaded[key]


def release() -> None:
    """Drop the kept pipeline and give its memory back."""
    with lock:
        _loaded.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
