"""The README's "run it" flow: upload, train the user's YAML on a tiny model, list, locate the LoRA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arch", ["sdxl", "zimage", "qwen_image", "flux2_klein_4b"])
def test_demo_runs_the_whole_flow_offline(arch, data_root):
    env = dict(os.environ, FASTBACKEND_DATA_DIR=str(data_root))
    result = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--arch", arch, "--steps", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lora = data_root / "output" / "nowy_dataset_1.3" / "nowy_dataset_1.3.safetensors"
    assert f"Your LoRA: {lora}" in result.stdout
    assert "list_models: 1 file(s): ['nowy_dataset_1.3.safetensors']" in result.stdout
    assert lora.stat().st_size > 0
