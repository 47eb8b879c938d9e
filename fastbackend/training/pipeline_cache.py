"""The last base pipeline ``generate`` used, kept loaded between jobs on a warm worker.

At most one pipeline is kept; training drops it first (``release``), since it needs the GPU
memory for its own copy. Callers hold ``lock`` while they use the pipeline.
"""

from __future__ import annotations

import threading

import torch

from fastbackend.storage import hf_cache_dir
from fastbackend.training.families import Family

lock = threading.RLock()
_loaded: dict[str, object] = {}  # base model -> pipeline; at most one entry


def pipeline(family: Family, source: str, field: str):
    """The pipeline of ``source`` on the best device, loaded unless it is the one kept."""
    with lock:
        if source not in _loaded:
            _loaded.clear()
            cuda = torch.cuda.is_available()
            pipe = family.load(source, torch.bfloat16 if cuda else torch.float32, str(hf_cache_dir()), field=field)
            _loaded[source] = pipe.to("cuda" if cuda else "cpu")
        return _loaded[source]


def release() -> None:
    """Drop the kept pipeline and give its memory back."""
    with lock:
        _loaded.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
