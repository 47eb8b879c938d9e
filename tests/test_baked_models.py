"""Models baked into the image: diffusers folders in ``FASTBACKEND_MODEL_DIRS``, named by absolute path.

Everything else outside the data root stays refused, links included.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_generate import generate
from tests.training_helpers import train, upload_photos, user_yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def baked(tiny_models, tmp_path, monkeypatch) -> Path:
    """A read-only model folder outside the data root, as the image's /models is."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "flux", models / "tiny-org" / "tiny-flux")
    monkeypatch.setenv("FASTBACKEND_MODEL_DIRS", f"/nowhere:{models}")
    return models


@pytest.mark.slow
def test_a_baked_model_trains_and_generates_by_its_absolute_path(baked, data_root):
    upload_photos()
    path = str(baked / "tiny-org" / "tiny-flux")
    answer = train(user_yaml(path, steps=2))
    assert answer["status"] == "success", answer
    images = generate()
    assert images["status"] == "success" and images["base_model"] == path, images


def test_a_folder_outside_the_data_root_and_the_model_dirs_is_refused(baked, data_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(baked / "tiny-org" / "tiny-flux", elsewhere)
    upload_photos()
    answer = train(user_yaml(str(elsewhere)))
    assert answer["error_code"] == "path_outside_root"
    assert answer["error"].endswith(
        f"models baked into the image must lie in FASTBACKEND_MODEL_DIRS (/nowhere:{baked})"
    )


def test_a_link_in_a_model_dir_that_leads_outside_is_refused(baked, data_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(baked / "tiny-org" / "tiny-flux", elsewhere)
    (baked / "linked").symlink_to(elsewhere)
    upload_photos()
    assert train(user_yaml(str(baked / "linked")))["error_code"] == "path_outside_root"


def test_model_dirs_must_be_absolute(monkeypatch):
    from fastbackend import settings

    monkeypatch.setenv("FASTBACKEND_MODEL_DIRS", "models")
    with pytest.raises(ValueError, match="FASTBACKEND_MODEL_DIRS='models' is not valid"):
        settings.check_all()


def test_the_image_can_bake_a_model_with_a_build_secret_and_looks_for_it():
    text = (REPO / "Dockerfile").read_text()
    assert "RUN --mount=type=secret,id=hf_token" in text and "ENV FASTBACKEND_MODEL_DIRS=/models" in text
    assert text.startswith("# syntax=docker/dockerfile:1")  # secret mounts need BuildKit's syntax
    for line in text.splitlines():
        if line.startswith(("ARG", "ENV")):
            assert "TOKEN" not in line, line  # a token in an argument or variable would stay in the image
    command = next(line for line in text.splitlines() if "hf download" in line)
    options = set(command.split()) | {"--exclude"}
    hf = Path(sys.executable).parent / "hf"
    usage = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    for option in (o for o in options if o.startswith("--")):
        assert option in usage, f"the pinned huggingface_hub's `hf download` has no {option}"
