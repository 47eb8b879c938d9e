"""The right GPU or a clear refusal: on RunPod, a worker whose NVIDIA GPU torch cannot use says why
in ``health`` and refuses to train or render on the CPU. The device checks are faked at their
boundary (``fastbackend.hardware``: the device files and nvidia-smi) and in torch's CUDA answer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastbackend import hardware, settings
from fastbackend.errors import FastBackendError
from handler_fast import handler
from tests.training_helpers import user_yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def old_driver_host(monkeypatch):
    """A RunPod GPU host with driver 550 (CUDA 12.4) under torch's CUDA 13.0 build: torch sees no GPU."""
    import torch

    monkeypatch.setattr(settings, "on_runpod", lambda: True)
    monkeypatch.setattr(hardware, "nvidia_devices", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(hardware, "driver_version", lambda: "550.54.15")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


REASON = "driver 550.54.15, but torch .* \\(a CUDA 13.0 build\\) cannot use them: it needs driver 580 or newer"


def test_health_says_the_gpu_cannot_be_used_and_why(old_driver_host):
    answer = handler({"id": "h", "input": {"type": "health"}})
    assert answer["status"] == "unhealthy" and re.search(REASON, answer["gpu_problem"])


def test_training_is_refused_instead_of_running_on_the_cpu(old_driver_host, data_root):
    answer = handler(
        {"id": "t", "input": {"type": "train_with_yaml", "yaml_config": user_yaml("/workspace/models/flux")}}
    )
    assert answer["error_code"] == "gpu_unavailable"
    assert answer["error"].startswith("config.process[0].device: 'cuda:0' asked for, and this worker has 1 NVIDIA GPU")
    assert re.search(REASON, answer["error"]) and not data_root.exists()  # refused before anything


def test_a_config_that_asks_for_the_cpu_is_not_refused_for_it(old_driver_host):
    yaml_text = user_yaml("/workspace/models/flux").replace("device: cuda:0", "device: cpu")
    answer = handler({"id": "t", "input": {"type": "train_with_yaml", "yaml_config": yaml_text}})
    assert answer["error_code"] != "gpu_unavailable"  # refused later, for the model that is not there


def test_generate_is_refused_too(old_driver_host, tiny_models, data_root):
    from safetensors.torch import load_file, save_file

    from fastbackend.layout import HeaderKey
    from tests.training_helpers import write_lora_file

    lora = write_lora_file(tiny_models, "flux", data_root / "output" / "m" / "m.safetensors")
    save_file(load_file(lora), lora, metadata={HeaderKey.ARCH: "flux", HeaderKey.BASE_MODEL: "/workspace/models/flux"})
    answer = handler({"id": "g", "input": {"type": "generate", "model": "m", "prompt": "a photo"}})
    assert answer["error_code"] == "gpu_unavailable" and re.search(REASON, answer["error"])


def test_a_runpod_worker_without_any_gpu_trains_nothing_on_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(settings, "on_runpod", lambda: True)
    monkeypatch.setattr(hardware, "nvidia_devices", list)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    answer = handler(
        {"id": "t", "input": {"type": "train_with_yaml", "yaml_config": user_yaml("/workspace/models/flux")}}
    )
    assert answer["error_code"] == "gpu_unavailable" and "this worker has no GPU" in answer["error"]


def test_off_runpod_the_cpu_fallback_stays(monkeypatch):
    monkeypatch.setattr(settings, "on_runpod", lambda: False)
    monkeypatch.setattr(hardware, "nvidia_devices", lambda: ["/dev/nvidia0"])
    hardware.refuse_cpu_fallback("cuda:0", "device")  # the warning path of a local run, unchanged


def test_the_image_and_the_hub_listing_keep_off_hosts_the_torch_build_cannot_use():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"RUNPOD_MIN_CUDA_VERSION={re.escape(hardware.TORCH_CUDA)}\b", dockerfile)
    assert re.search(r"RUNPOD_GPU_BENCHMARK_TIMEOUT=10\b", dockerfile)  # README: start-up checks
    minimum = tuple(int(part) for part in hardware.TORCH_CUDA.split("."))
    for name in ("hub.json", "tests.json"):
        allowed = json.loads((REPO / ".runpod" / name).read_text())["config"]["allowedCudaVersions"]
        assert allowed and all(tuple(int(p) for p in v.split(".")) >= minimum for v in allowed), name
    assert hardware.needed_driver(hardware.TORCH_CUDA) == 580
    requirements = (REPO / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements  # TORCH_CUDA names this build's CUDA; a new pin re-checks it


def test_the_hub_listing_names_every_family_the_worker_trains():
    from fastbackend.config import ARCHES

    shown = {
        "flux": "FLUX.1",
        "flux2": "FLUX.2",
        "flux2_klein_4b": "klein 4B",
        "flux2_klein_9b": "9B",
        "qwen_image": "Qwen-Image",
        "zimage": "Z-Image",
        "sdxl": "SDXL",
        "sd15": "SD 1.5",
    }
    assert set(shown) == set(ARCHES)  # a new family needs its words here and in the listing
    description = json.loads((REPO / ".runpod" / "hub.json").read_text())["description"]
    assert all(words in description for words in shown.values())


def test_a_rehearsal_may_keep_the_cpu_fallback_on_runpod(old_driver_host, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_CPU_FALLBACK", "1")
    hardware.refuse_cpu_fallback("cuda:0", "device")  # devtools/endpoint.py's workers run this way


def test_a_gpu_index_this_worker_lacks_is_refused_not_run_on_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(settings, "on_runpod", lambda: True)
    monkeypatch.setattr(hardware, "nvidia_devices", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    hardware.refuse_cpu_fallback("cuda:0", "device")
    with pytest.raises(FastBackendError, match=r"^device: 'cuda:1' asked for, and this worker has 1 GPU\(s\)"):
        hardware.refuse_cpu_fallback("cuda:1", "device")


def test_a_new_enough_driver_is_not_blamed(old_driver_host, monkeypatch):
    monkeypatch.setattr(hardware, "driver_version", lambda: "580.65.06")
    problem = hardware.gpu_problem()
    assert "driver 580.65.06" in problem and "newer driver" not in problem and "needs driver" not in problem
