"""The image definition stays lint-clean and installs what the worker imports."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: scripts/setup.sh installs it from requirements-dev.txt")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_the_package_and_both_entry_points():
    text = (REPO / "Dockerfile").read_text()
    for needed in (
        "COPY requirements.txt",
        "COPY fastbackend/",
        "handler.py handler_fast.py",
        'CMD ["python", "-u", "handler_fast.py"]',
    ):
        assert needed in text
