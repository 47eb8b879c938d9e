"""``generate``: images from a trained LoRA on its base model, answered as base64.

The base model and architecture come from the LoRA file's own header (written at training
time), so the request names only the model. The last base pipeline stays loaded between jobs:
a warm worker answers the next ``generate`` without reloading gigabytes.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Callable

import torch

from fastbackend.errors import ErrorCode, FastBackendError, NotFound
from fastbackend.operations import check_result_size, read_lora_header
from fastbackend.schemas import GenerateRequest
from fastbackend.storage import hf_cache_dir, model_dir
from fastbackend.training.models import arch_for
from fastbackend.training.operation import resolve_model

Progress = Callable[[dict], None]
ADAPTER = "generate"
_LOADED: dict[str, object] = {}  # base model -> pipeline; at most one entry
_LOCK = threading.Lock()


def generate(request: GenerateRequest, progress: Progress | None = None) -> dict:
    lora = model_dir(request.model) / (request.filename or f"{request.model}.safetensors")
    if not lora.is_file():
        raise NotFound(f"input.model: no LoRA file {lora.name!r} in model {request.model!r}")
    header = read_lora_header(lora)
    arch_name, base = header.get("fastbackend_arch"), header.get("ss_sd_model_name")
    if arch_name not in ("flux", "sdxl", "sd15") or not base:
        raise FastBackendError(
            f"input.model: {lora.name!r} was not made by this worker (no base model in its header)",
            code=ErrorCode.UNKNOWN_LORA,
        )
    arch = arch_for(arch_name)
    with _LOCK:  # one pipeline, one LoRA at a time
        pipe = _pipeline(arch, resolve_model(base))
        try:
            pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
        except (OSError, ValueError, KeyError) as exc:
            _LOADED.clear()  # the pipeline may hold half an adapter now
            raise FastBackendError(
                f"input.model: {lora.name!r} does not load into {base!r} ({type(exc).__name__})",
                code=ErrorCode.UNKNOWN_LORA,
            ) from None
        try:
            pipe.set_adapters([ADAPTER], adapter_weights=[request.lora_scale])
            images = _render(arch, pipe, request)
        finally:
            pipe.delete_adapters([ADAPTER])
    encoded = [_encode(image, request.format) | {"seed": request.seed + i} for i, image in enumerate(images)]
    check_result_size(encoded, "images", "ask for fewer or smaller images, or format jpg")
    return {"status": "success", "model": request.model, "filename": lora.name, "base_model": base, "images": encoded}


def release() -> None:
    """Drop the kept pipeline (training needs the GPU memory for its own copy)."""
    with _LOCK:
        _LOADED.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pipeline(arch, source: str):
    if source not in _LOADED:
        _LOADED.clear()
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda else torch.float32
        pipe = arch.load(source, dtype, str(hf_cache_dir()), field="the LoRA's base model (ss_sd_model_name)")
        _LOADED[source] = pipe.to("cuda" if cuda else "cpu")
    return _LOADED[source]


@torch.no_grad()
def _render(arch, pipe, request: GenerateRequest) -> list:
    width, height = arch.snap_size(pipe, request.width, request.height)
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]
    return pipe(
        [request.prompt] * request.num_images,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        width=width,
        height=height,
        generator=generators,
        **arch.sample_kwargs(pipe, request.negative_prompt),
    ).images


def _encode(image, fmt: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 95} if fmt == "jpg" else {}))
    return {
        "content": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "format": fmt,
        "width": image.width,
        "height": image.height,
    }
