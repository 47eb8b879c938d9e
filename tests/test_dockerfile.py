"""The image definition stays lint-clean and installs what the worker imports."""

import ast
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


def test_the_image_holds_the_worker_and_no_dev_tools():
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])  # every argument but the destination
    assert copied == {"requirements.txt", "fastbackend/", "handler.py", "handler_fast.py", "test_input.json"}
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {"devtools/", "tests/", "benchmarks/", "scripts/", "examples/", ".venv/"} <= ignored


def test_the_worker_package_never_imports_dev_tools():
    for path in (REPO / "fastbackend").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] in ("devtools", "tests", "handler_fast") for name in names), path


def test_the_image_has_the_c_compiler_torch_compile_needs():
    text = (REPO / "Dockerfile").read_text()
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in text
