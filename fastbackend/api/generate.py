"""``generate``: images from a trained LoRA on its base model, answered as base64.

The base model and family come from the LoRA file's own header (written at training time), so
the request names only the model; steps and guidance default to the pipeline's own, or for a LoRA
trained through a training adapter (a step-distilled base) to those of its samples. The base
pipeline stays loaded between jobs (``training.pipeline_cache``): a warm worker answers the next
``generate`` without reloading.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
from collections.abc import Callable

import torch
from pydantic import ValidationError

from fastbackend import hardware, stopping
from fastbackend.api import Progress, check_result_size
from fastbackend.config import SampleConfig
from fastbackend.errors import ErrorCode, FastBackendError, NotFound
from fastbackend.images import PIL_FORMATS
from fastbackend.layout import HeaderKey, LoraFolder, read_header
from fastbackend.schemas import GenerateRequest
from fastbackend.storage import lora_dir, no_links, resolve_base_model
from fastbackend.training import pipeline_cache
from fastbackend.training.families import FAMILIES, Family, family_for
from fastbackend.training.sampling import between_steps

ADAPTER = "generate"
BASE_MODEL_FIELD = f"the LoRA's base model ({HeaderKey.BASE_MODEL.value})"


def generate(request: GenerateRequest, progress: Progress | None = None) -> dict:
    folder = LoraFolder(lora_dir(request.model))
    lora = no_links(folder.path / request.filename if request.filename else folder.final_lora)
    if not lora.is_file():
        raise NotFound(f"input.model: no LoRA file {lora.name!r} in model {request.model!r}")
    header = read_header(lora)
    family_name, base = header.get(HeaderKey.ARCH), header.get(HeaderKey.BASE_MODEL)
    if family_name not in FAMILIES or not base:
        raise FastBackendError(
            f"input.model: {lora.name!r} was not made by this worker (no base model in its header)",
            code=ErrorCode.UNKNOWN_LORA,
        )
    family = family_for(family_name)
    hardware.refuse_cpu_fallback("cuda", "generate")  # on RunPod: rendered on the GPU, or refused
    request = distilled_defaults(header, request)
    report = progress or (lambda info: None)
    with pipeline_cache.lock:  # one pipeline, one LoRA at a time
        report({"stage": "loading_model", "model": base})
        downloaded = lambda got, total: report(  # noqa: E731
            {"stage": "loading_model", "model": base, "downloaded_bytes": got, "total_bytes": total}
        )
        pipe = pipeline_cache.pipeline(family, resolve_base_model(base, BASE_MODEL_FIELD), BASE_MODEL_FIELD, downloaded)
        try:
            pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
        except (OSError, ValueError, KeyError) as exc:
            pipeline_cache.release()  # the pipeline may hold half an adapter now
            raise FastBackendError(
                f"input.model: {lora.name!r} does not load into {base!r} ({type(exc).__name__})",
                code=ErrorCode.UNKNOWN_LORA,
            ) from None
        try:
            pipe.set_adapters([ADAPTER], adapter_weights=[request.lora_scale])
            report({"stage": "generating", "images": request.num_images})
            images = render(family, pipe, request, stopping.stop_check("generating"))
        finally:
            pipe.delete_adapters([ADAPTER])
    encoded = [encode(image, request.format) | {"seed": request.seed + i} for i, image in enumerate(images)]
    check_result_size(encoded, "images", "ask for fewer or smaller images, or format jpg")
    answer = {"status": "success", "model": request.model, "filename": lora.name, "base_model": base}
    return answer | render_settings(family, pipe, request) | {"images": encoded}


def distilled_defaults(header: dict[str, str], request: GenerateRequest) -> GenerateRequest:
    """A LoRA trained through a training adapter (``zimage:turbo``, FLUX.1-schnell's) is for a step-
    distilled base, which shares its pipeline, and so that pipeline's defaults, with the undistilled
    model (Z-Image: 50 steps at CFG 5; Turbo wants about 9 without guidance). For such a LoRA the steps
    and guidance its samples were rendered with are the defaults instead; what the request names wins,
    and a value past what a request may ask is left to the pipeline.

    Read from the header's config as written (three keys), not by validating it again: a config the
    schema of this worker would no longer take must not silently lose its defaults."""
    try:
        process = json.loads(header.get(HeaderKey.CONFIG, ""))["config"]["process"][0]
        sample, adapter = process.get("sample"), process["model"].get("assistant_lora_path")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return request
    if not adapter or not isinstance(sample, dict):
        return request
    fields = SampleConfig.model_fields
    samples = {
        "steps": sample.get("sample_steps", fields["sample_steps"].default),
        "guidance_scale": sample.get("guidance_scale", fields["guidance_scale"].default),
    }
    for name, value in samples.items():
        if getattr(request, name) is None:
            with contextlib.suppress(ValidationError):  # past a request's limits: the pipeline's own
                request = GenerateRequest.model_validate(request.model_dump() | {name: value})
    return request


@torch.no_grad()
def render(family: Family, pipe, request: GenerateRequest, check_stop: Callable[[], None]) -> list:
    """The request's images; ``check_stop`` runs after every denoising step."""
    width, height = family.snap_size(pipe, request.width, request.height)
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]
    extra = family.sample_kwargs(pipe, request.negative_prompt)
    if isinstance(extra.get("negative_prompt"), str):  # one per prompt, as the pipelines want a list
        extra["negative_prompt"] = [extra["negative_prompt"]] * request.num_images
    named = {"num_inference_steps": request.steps} if request.steps is not None else {}
    if request.guidance_scale is not None:
        named |= family.guidance_arguments(request.guidance_scale)
    return pipe(
        prompt=[request.prompt] * request.num_images,  # by name: FLUX.2 [klein]'s first argument is an image
        width=width,
        height=height,
        generator=generators,
        callback_on_step_end=between_steps(check_stop),
        **named,
        **extra,
    ).images


def render_settings(family: Family, pipe, request: GenerateRequest) -> dict:
    """The steps and guidance the pipeline ran with: the request's, else the pipeline's own defaults.
    ``guidance`` is as the pipeline took it (Z-Image's is the usual scale minus 1, Qwen-Image's is
    ``true_cfg_scale``)."""
    parameters = inspect.signature(pipe.__call__).parameters

    def default(name: str):
        return parameters[name].default if name in parameters else None

    steps = request.steps if request.steps is not None else default("num_inference_steps")
    if request.guidance_scale is not None:
        return {"steps": steps, "guidance": family.guidance_arguments(request.guidance_scale)}
    return {"steps": steps, "guidance": {name: default(name) for name in family.guidance_arguments(1.0)}}


def encode(image, fmt: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[fmt], **({"quality": 95} if fmt == "jpg" else {}))
    return {
        "content": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "format": fmt,
        "width": image.width,
        "height": image.height,
    }
