"""The light request types: health, and listing, downloading and deleting trained LoRAs.

Nothing here imports torch at module level; ``health`` with ``deep`` does, to ask about GPUs.
Every operation takes its validated request and a ``progress`` callback and answers a dict
with ``"status": "success"``.
"""

from __future__ import annotations

import base64
import json
import platform
import shutil
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from fastbackend import __version__
from fastbackend.errors import ErrorCode, FastBackendError, NotFound
from fastbackend.schemas import (
    DeleteModelRequest,
    DownloadModelRequest,
    GetSamplesRequest,
    HealthRequest,
    ListModelsRequest,
)
from fastbackend.storage import RUNPOD_VOLUME, data_root, model_dir, outputs_dir, remove_tree, sha256_file

Progress = Callable[[dict], None]
METADATA_FILE = "metadata.json"
# RunPod refuses results over 10 MB on /run; leave room for the other fields.
MAX_RESULT_BYTES = 9_500_000


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
    if request.deep:
        answer["gpu"] = gpu_facts()
    return answer


def gpu_facts() -> dict:
    """Name, memory and CUDA version of each visible GPU, or an explicit "no GPU"."""
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


def read_lora_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (no tensors are read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.metadata() or {}


def _recorded_sha256(folder: Path) -> dict[str, str]:
    """sha256 per file as recorded by the trainer when it saved them."""
    try:
        return json.loads((folder / METADATA_FILE).read_text()).get("sha256", {})
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return {}


def describe_lora(path: Path, recorded: dict[str, str]) -> dict:
    stat = path.stat()
    header = read_lora_header(path)
    return {
        "name": path.parent.name,
        "filename": path.name,
        "path": str(path),
        "size": stat.st_size,
        "modified": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds"),
        "arch": header.get("fastbackend_arch"),
        "base_model": header.get("ss_sd_model_name"),
        "rank": _int_or_none(header.get("ss_network_dim")),
        "steps": _int_or_none(header.get("ss_steps")),
        "sha256": recorded.get(path.name) or sha256_file(path),
    }


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def list_models(request: ListModelsRequest, progress: Progress | None = None) -> dict:
    """Every LoRA file under ``<root>/output/<model>/``; temporary (dot) files are never listed."""
    models = []
    root = outputs_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        recorded = _recorded_sha256(folder)
        for path in sorted(folder.glob("*.safetensors")):
            if not path.name.startswith("."):
                models.append(describe_lora(path, recorded))
    return {"status": "success", "models": models, "total_count": len(models)}


def download_model(request: DownloadModelRequest, progress: Progress | None = None) -> dict:
    """One base64 chunk of a model file; call again with ``next_offset`` until it is null."""
    folder = model_dir(request.model)
    filename = request.filename or f"{request.model}.safetensors"
    path = folder / filename
    if not path.is_file() or path.suffix != ".safetensors":
        available = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        raise NotFound(f"input.filename: {filename!r} not found in model {request.model!r}; files: {available}")
    total = path.stat().st_size
    if request.offset > total:
        raise FastBackendError(
            f"input.offset: {request.offset} is past the end of the file ({total} bytes)",
            code=ErrorCode.VALIDATION_ERROR,
        )
    with open(path, "rb") as handle:
        handle.seek(request.offset)
        chunk = handle.read(request.length)
    end = request.offset + len(chunk)
    return {
        "status": "success",
        "model": request.model,
        "filename": filename,
        "offset": request.offset,
        "length": len(chunk),
        "total_size": total,
        "next_offset": end if end < total else None,
        "sha256": _recorded_sha256(folder).get(filename) or sha256_file(path),
        "content": base64.b64encode(chunk).decode("ascii"),
    }


def check_result_size(images: list[dict], what: str, advice: str) -> None:
    """Refuse base64 images that together would break RunPod's result limit."""
    size = sum(len(image["content"]) for image in images)
    if size > MAX_RESULT_BYTES:
        raise FastBackendError(
            f"output: {size:,} bytes of {what} is over RunPod's {MAX_RESULT_BYTES:,}-byte result limit; {advice}",
            code=ErrorCode.RESULT_TOO_LARGE,
        )


def get_samples(request: GetSamplesRequest, progress: Progress | None = None) -> dict:
    """The sample images of one step (default: the newest), base64, and the steps that have samples."""
    folder = model_dir(request.model) / "samples"
    by_step: dict[int, list[Path]] = {}
    for path in sorted(folder.glob("*_*.*")) if folder.is_dir() else []:
        step, _, _ = path.stem.partition("_")
        if step.isdigit() and not path.name.startswith("."):
            by_step.setdefault(int(step), []).append(path)
    if not by_step:
        raise NotFound(f"input.model: model {request.model!r} has no samples")
    step = max(by_step) if request.step is None else request.step
    if step not in by_step:
        raise NotFound(f"input.step: no samples at step {step}; steps with samples: {sorted(by_step)}")
    images = [{"filename": p.name, "content": base64.b64encode(p.read_bytes()).decode("ascii")} for p in by_step[step]]
    check_result_size(images, "samples", "ask for one step at a time")
    return {"status": "success", "model": request.model, "step": step, "steps": sorted(by_step), "images": images}


def delete_model(request: DeleteModelRequest, progress: Progress | None = None) -> dict:
    folder = model_dir(request.model)
    if not folder.is_dir():
        raise NotFound(f"input.model: model {request.model!r} does not exist")
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    remove_tree(folder)
    return {"status": "success", "deleted": request.model, "files": files}
