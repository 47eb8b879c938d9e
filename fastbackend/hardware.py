"""The GPU this worker can use, or why not: an NVIDIA device that torch cannot drive is a host whose
driver is too old for torch's CUDA build, and a worker there must say so instead of training on
the CPU at GPU prices.

The device checks (``/dev/nvidia*``, ``nvidia-smi``) are this module's boundary: tests fake them here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from fastbackend import settings
from fastbackend.errors import ErrorCode, FastBackendError

# The CUDA release of the torch build requirements.txt pins on GPU machines (torch 2.13.0 from the
# package index); the Dockerfile's RUNPOD_MIN_CUDA_VERSION and the Hub listing's allowed CUDA
# versions follow it (a test compares them).
TORCH_CUDA = "13.0"
# The oldest NVIDIA driver for each CUDA release torch is built against (NVIDIA's CUDA
# compatibility table, Linux). A CUDA 13 build of torch needs driver 580 or newer.
MIN_DRIVER = {"13": 580, "12.9": 575, "12.8": 570, "12.6": 560, "12.4": 550, "12.1": 530, "11.8": 520}
NVIDIA_SMI_TIMEOUT_S = 10


def nvidia_devices() -> list[str]:
    """The NVIDIA GPU device files the container sees (the NVIDIA runtime adds them)."""
    return sorted(str(path) for path in Path("/dev").glob("nvidia[0-9]*"))


def driver_version() -> str | None:
    """The host's NVIDIA driver version, from ``nvidia-smi``; None when it cannot say."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def needed_driver(cuda: str | None) -> int | None:
    """The oldest driver for a CUDA build ``cuda`` (``"13.0"``, ``"12.8"``), when known."""
    if not cuda:
        return None
    major = cuda.split(".")[0]
    return MIN_DRIVER.get(".".join(cuda.split(".")[:2])) or MIN_DRIVER.get(major)


def gpu_problem() -> str | None:
    """Why the NVIDIA GPU this worker sees cannot be used by torch, or None (no such GPU, or it works).
    Imports torch only when there is a device to ask about."""
    devices = nvidia_devices()
    if not devices:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    driver, cuda = driver_version() or "unknown", torch.version.cuda
    needed = needed_driver(cuda)
    return (
        f"this worker has {len(devices)} NVIDIA GPU(s) with driver {driver}, but torch {torch.__version__} "
        f"(a CUDA {cuda or 'unknown'} build) cannot use them"
        + (f": it needs driver {needed} or newer" if needed and _too_old(driver, needed) else "")
        + (
            "; deploy on hosts with a newer driver (the endpoint's allowed CUDA versions)"
            if _too_old(driver, needed)
            else ""
        )
    )


def _too_old(driver: str, needed: int | None) -> bool:
    """Whether ``driver`` ("550.54.15") is older than ``needed`` (unknown counts as too old)."""
    try:
        return needed is None or int(driver.split(".")[0]) < needed
    except ValueError:
        return True


def refuse_cpu_fallback(device: str, field: str) -> None:
    """On RunPod, a job that asks for a GPU runs on one or is refused: a GPU worker that cannot use
    its GPU says why, and nothing trains or renders on the CPU unless its config asks for it."""
    if not settings.on_runpod() or not device.startswith("cuda") or settings.CPU_FALLBACK.get():
        return
    problem = gpu_problem()
    if problem is None:
        import torch

        index = torch.device(device).index or 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return
        problem = f"this worker has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} GPU(s)"
    raise FastBackendError(
        f"{field}: {device!r} asked for, and {problem}; nothing runs on the CPU on RunPod unless asked (device: cpu)",
        code=ErrorCode.GPU_UNAVAILABLE,
    )
