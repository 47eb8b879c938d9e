"""Shared test set-up: one torch thread, quiet offline libraries, a fresh data root per test."""

import os

# Before torch is imported anywhere: two threads collapse when anything else uses a core,
# and no test may reach a hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty data root."""
    root = tmp_path / "volume"
    monkeypatch.setenv("FASTBACKEND_DATA_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny random-weight pipelines of every architecture, built once per session."""
    from devtools import tiny

    folder = tmp_path_factory.mktemp("tiny-models")
    for arch in tiny.BUILDERS:
        tiny.build(arch, folder / arch)
    return folder
