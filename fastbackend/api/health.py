"""``health``: is the worker up, where is its data, and (``deep``) which GPUs does it see. On RunPod a
worker whose NVIDIA GPU torch cannot use (a host driver too old for its CUDA build) is unhealthy."""

from __future__ import annotations

import platform
import shutil
from importlib.metadata import version

from fastbackend import __version__, hardware, settings
from fastbackend.api import Progress
from fastbackend.schemas import HealthRequest
from fastbackend.storage import RUNPOD_VOLUME, data_root


def health(request: HealthRequest, progress: Progress | None = None) -> dict:
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(root)
    answer = {
        "status": "healthy",
        "version": __version__,
        "python": platform.python_version(),
        "runpod": version("runpod"),
        "data_root": str(root),
        "volume_mounted": RUNPOD_VOLUME.is_mount() and root.is_relative_to(RUNPOD_VOLUME),
        "disk_free_gb": round(disk.free / 1e9, 2),
        "disk_total_gb": round(disk.total / 1e9, 2),
    }
    if settings.on_runpod() and (problem := hardware.gpu_problem()) is not None:
        answer |= {"status": "unhealthy", "gpu_problem": problem}
    if request.deep:
        answer["gpu"] = gpu_facts()
    return answer


def gpu_facts() -> dict:
    """Name, memory and CUDA version of each visible GPU, or an explicit "no GPU" (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "message": "no GPU: CUDA is not available", "torch": torch.__version__}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "memory_total_gb": round(total / 1e9, 2),
                "memory_free_gb": round(free / 1e9, 2),
            }
        )
    return {"available": True, "cuda": torch.version.cuda, "torch": torch.__version__, "devices": devices}
