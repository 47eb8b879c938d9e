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

import http.server
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import settings

# The same examples on every run (CI must not fail by chance); HYPOTHESIS_PROFILE=explore searches anew.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items):
    """Tests that train or render on the tiny models are the slow tier: `pytest -m slow` runs them
    alone, `pytest -m "not slow"` runs everything else (about a minute on 2 cores)."""
    for item in items:
        if {"tiny_models", "tiny_captioner"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty data root."""
    root = tmp_path / "volume"
    monkeypatch.setenv("FASTBACKEND_DATA_DIR", str(root))
    return root


@pytest.fixture(autouse=True)
def no_shutdown_between_tests():
    """A test that sends SIGTERM leaves the worker's shutdown flag set; the next test's worker is new."""
    yield
    from fastbackend import stopping

    stopping._shutting_down = False


@pytest.fixture(autouse=True)
def no_warm_pipeline_between_tests():
    """generate keeps its base pipeline loaded between jobs; tests must not inherit one."""
    yield
    if "fastbackend.training.pipeline_cache" in sys.modules:
        sys.modules["fastbackend.training.pipeline_cache"].release()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny random-weight pipelines of every architecture, built once per session."""
    from devtools import tiny

    folder = tmp_path_factory.mktemp("tiny-models")
    for arch in tiny.BUILDERS:
        tiny.build(arch, folder / arch)
    return folder


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory) -> Path:
    """A tiny Florence-2 taught to say ``devtools.tiny.TINY_CAPTION``, built once per session."""
    from devtools import tiny

    return tiny.build_captioner(tmp_path_factory.mktemp("tiny-captioner") / "florence")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a folder, for the `urls` path."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: QuietHandler(*a, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
