"""``list_models``, ``download_model``, ``get_samples`` and ``delete_model``: the trained LoRAs.

The request contract calls a trained LoRA a "model"; here it is a ``layout.LoraFolder``. Nothing
here imports torch: headers are read with safetensors alone.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

from fastbackend import bucket, settings
from fastbackend.api import Progress, check_result_size
from fastbackend.errors import ErrorCode, FastBackendError, NotFound
from fastbackend.layout import LORA_SUFFIX, HeaderKey, LoraFolder, read_header
from fastbackend.schemas import DeleteModelRequest, DownloadModelRequest, GetSamplesRequest, ListModelsRequest
from fastbackend.storage import list_names, lora_dir, no_links, outputs_dir, remove_tree, sha256_file


def list_models(request: ListModelsRequest, progress: Progress | None = None) -> dict:
    """Every LoRA file under ``<root>/output/<name>/``; temporary (dot) files are never listed."""
    models = []
    for name in list_names(outputs_dir()):
        folder = LoraFolder(outputs_dir() / name)
        recorded, scores = folder.recorded_sha256(), folder.recorded_likeness()
        models += [describe_lora(lora, recorded, scores) for lora in folder.lora_files()]
    return {"status": "success", "models": models, "total_count": len(models)}


def describe_lora(path: Path, recorded: dict[str, str], likeness: dict[int, float] | None = None) -> dict:
    stat = path.stat()
    header = read_header(path)
    steps = _int_or_none(header.get(HeaderKey.STEPS))
    return {
        "name": path.parent.name,
        "filename": path.name,
        "path": str(path),
        "size": stat.st_size,
        "modified": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(timespec="seconds"),
        "arch": header.get(HeaderKey.ARCH),
        "base_model": header.get(HeaderKey.BASE_MODEL),
        "rank": _int_or_none(header.get(HeaderKey.RANK)),
        "steps": steps,
        "sha256": recorded.get(path.name) or sha256_file(path),
        "likeness": (likeness or {}).get(steps) if steps is not None else None,
    }


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def download_model(request: DownloadModelRequest, progress: Progress | None = None) -> dict:
    """One base64 chunk of a LoRA file; call again with ``next_offset`` until it is null."""
    folder = LoraFolder(lora_dir(request.model))
    filename = request.filename or folder.final_lora.name
    path = no_links(folder.path / filename)
    if not path.is_file() or path.suffix != LORA_SUFFIX:
        available = [p.name for p in folder.lora_files()]
        raise NotFound(f"input.filename: {filename!r} not found in model {request.model!r}; files: {available}")
    total = path.stat().st_size
    sha256 = folder.recorded_sha256().get(filename) or sha256_file(path)
    if request.url:  # the whole file behind a link, for files too large to pass as chunks comfortably
        if not settings.bucket_configured():
            raise FastBackendError(f"input.url: {bucket.NOT_CONFIGURED}", code=ErrorCode.INVALID_REQUEST)
        answer = {"status": "success", "model": request.model, "filename": filename, "size": total, "sha256": sha256}
        return answer | bucket.publish(folder, path, sha256)
    if request.offset > total:
        raise FastBackendError(
            f"input.offset: {request.offset} is past the end of the file ({total} bytes)",
            code=ErrorCode.VALIDATION_ERROR,
        )
    with path.open("rb") as handle:
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
        "sha256": sha256,
        "content": base64.b64encode(chunk).decode("ascii"),
    }


def get_samples(request: GetSamplesRequest, progress: Progress | None = None) -> dict:
    """The sample images of one step (default: the newest), base64, and the steps that have samples."""
    by_step = LoraFolder(lora_dir(request.model)).samples_by_step()
    if not by_step:
        raise NotFound(f"input.model: model {request.model!r} has no samples")
    step = max(by_step) if request.step is None else request.step
    if step not in by_step:
        raise NotFound(f"input.step: no samples at step {step}; steps with samples: {sorted(by_step)}")
    images = [{"filename": p.name, "content": base64.b64encode(p.read_bytes()).decode("ascii")} for p in by_step[step]]
    check_result_size(images, "samples", "ask for one step at a time")
    return {"status": "success", "model": request.model, "step": step, "steps": sorted(by_step), "images": images}


def delete_model(request: DeleteModelRequest, progress: Progress | None = None) -> dict:
    folder = LoraFolder(lora_dir(request.model))
    if not folder.path.is_dir():
        raise NotFound(f"input.model: model {request.model!r} does not exist")
    files = [p.name for p in folder.lora_files()]
    remove_tree(folder.path)
    return {"status": "success", "deleted": request.model, "files": files}
