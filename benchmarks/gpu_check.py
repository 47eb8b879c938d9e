"""The GPU check, for a session that has a GPU: one prepared run of a few minutes.

It imports the training core only (no handler, no runpod), so the lent machine needs just the
wheels it lacks (``benchmarks/gpu_bundle.sh`` builds them into ``gpu_wheels/``, which the device
tool carries). Then, in one command there:

    pip install --no-index --find-links gpu_wheels diffusers bitsandbytes pydantic prodigyopt \
        && python3 -m benchmarks.gpu_check

1. The tiny FLUX / SDXL / SD 1.5 pipelines trained on the GPU with the user's settings (bf16,
   adamw8bit, ``quantize``, gradient checkpointing): no run may say that any of them fell back,
   and the 8-bit layers and optimizer must really be the ones training.
2. Full-size random-weight FLUX.1-dev and SDXL denoisers (their published configs, no download)
   with a rank-16 LoRA through the trainer's own loss at 1024 px, bf16, adamw8bit: with and
   without checkpointing and 8-bit base weights, seconds per micro-batch and per optimizer step
   (the user's YAML accumulates 4), peak memory allocated and reserved, and the memory plan's
   estimate of the same (its training phase) beside them.
3. Host syncs per trainer step (CUDA's sync debug mode, tiny FLUX): the aim is the one loss read.

    .venv/bin/python -m benchmarks.gpu_check --smoke      # on a CPU: tiny shapes, to check the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from devtools import tiny
from devtools.demo import DATASET, tiny_config

FALLBACKS = ("needs bitsandbytes", "is not available here", "needs CUDA")
ACCUMULATE = 4  # the user's gradient_accumulation_steps
SETTINGS = ((False, False), (False, True), (True, True))  # (8-bit base weights, checkpointing)


def environment() -> str:
    import bitsandbytes
    import diffusers
    import torch

    if not torch.cuda.is_available():
        return f"CPU only: torch {torch.__version__}, diffusers {diffusers.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (
        f"GPU: {props.name}, {props.total_memory / 1e9:.0f} GB; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"diffusers {diffusers.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )


def upload_dataset() -> None:
    """Three synthetic photos through the upload core, as the handler would store them."""
    import base64

    from devtools.photos import synthetic_photo
    from fastbackend.api.datasets import upload_training_data
    from fastbackend.schemas import UploadTrainingDataRequest

    files = [
        {
            "filename": f"IMG_{i}.jpg",
            "content": base64.b64encode(synthetic_photo(384, 320 + 32 * i, i)).decode(),
            "caption": f"Matt, photo {i}",
        }
        for i in range(3)
    ]
    upload_training_data(UploadTrainingDataRequest(type="upload_training_data", training_name=DATASET, files=files))


def tiny_runs(device: str, root: Path) -> None:
    """Each tiny architecture trained with the user's CUDA settings: nothing may fall back."""
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest

    print(f"{'tiny model':<12}{'s':>7}{'final loss':>12}  warnings")
    for arch in ("flux", "sdxl", "sd15"):
        folder = tiny.build(arch, root / "models" / arch)
        text = tiny_config(str(folder), arch, steps=6).replace("device: cuda:0", f"device: {device}")
        started = time.perf_counter()
        answer = train_with_yaml(TrainWithYamlRequest(type="train_with_yaml", yaml_config=text, resume=False))
        print(f"{arch:<12}{time.perf_counter() - started:>7.1f}{answer['final_loss']:>12.4f}  {answer['warnings']}")
        fell_back = [w for w in answer["warnings"] if any(f in w for f in FALLBACKS)]
        assert device == "cpu" or not fell_back, fell_back


def int8_paths_active(device: str, root: Path) -> str:
    """Set up the user's FLUX config on the tiny model: 8-bit layers under the LoRA, 8-bit AdamW."""
    from fastbackend.config import parse_training_config
    from fastbackend.layout import LoraFolder
    from fastbackend.training.int8 import FrozenLinear8bit
    from fastbackend.training.run import TrainJob
    from fastbackend.training.setup import set_up

    folder = root / "models" / "flux"
    text = tiny_config(str(folder), "flux", 2).replace("device: cuda:0", f"device: {device}")
    config, _ = parse_training_config(text)
    job = TrainJob(config, str(folder), [root / "training_data" / DATASET], LoraFolder(root / "output" / "int8"))
    run = set_up(job)
    layers = [m for m in run.denoiser.modules() if isinstance(m, FrozenLinear8bit)]
    optimizer = type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__
    assert layers and optimizer == "AdamW8bit", (len(layers), optimizer)
    weight = layers[0].weight
    return f"{len(layers)} FrozenLinear8bit layers ({weight.dtype} on {weight.device}), optimizer {optimizer}"


def host_syncs(device: str, root: Path, steps: int = 6) -> str:
    """Synchronizing CUDA calls per trainer step (tiny FLUX, the user's settings): the aim is one,
    the loss read; every other one leaves the GPU idle while the host catches up."""
    import warnings

    import torch

    from fastbackend.config import parse_training_config
    from fastbackend.layout import LoraFolder
    from fastbackend.training.run import TrainJob
    from fastbackend.training.setup import set_up
    from fastbackend.training.trainer import train_step

    folder = root / "models" / "flux"
    text = tiny_config(str(folder), "flux", 40).replace("device: cuda:0", f"device: {device}")
    config, _ = parse_training_config(text)
    run = set_up(TrainJob(config, str(folder), [root / "training_data" / DATASET], LoraFolder(root / "output" / "s")))
    train_step(run)  # the first step allocates, compiles kernels, fills caches
    run.step += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                train_step(run)
                run.step += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return f"host syncs per step: {len(syncs) / steps:.1f} (aim: 1, the loss read); first: {syncs[:3]}"


@dataclass
class Row:
    arch: str
    quantize: bool
    checkpointing: bool
    micro_s: float
    update_s: float
    allocated_gb: float
    reserved_gb: float
    plan_gb: float


def denoiser(arch: str, device: str, smoke: bool, quantize: bool):
    """The published denoiser (or a tiny one) with random weights, its LoRA, on ``device``."""
    import json

    import diffusers
    import torch

    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for
    from fastbackend.training.memory_plan import SHAPES
    from fastbackend.training.setup import quantize_8bit

    family = family_for(arch)
    if smoke:
        config = dict(tiny.TINY_FLUX_TRANSFORMER) if arch == "flux" else sdxl_tiny_unet()
        model_class = diffusers.FluxTransformer2DModel if arch == "flux" else diffusers.UNet2DConditionModel
    else:
        config = json.loads((SHAPES / arch / family.denoiser_name / "config.json").read_text())
        model_class = getattr(diffusers, config.pop("_class_name"))
    cuda = device.startswith("cuda")
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    try:
        with torch.device(device):
            model = model_class(**config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    if quantize:  # as the trainer does: swapped on the CPU, quantized as the layers move to the GPU
        model.to("cpu")
        torch.cuda.empty_cache()  # the bf16 weights' blocks go back: the trainer never holds them on the GPU
        quantize_8bit(model, family.lora_targets(model))
        model.to(device)
    params = lora_io.add_lora(model, family.lora_targets(model), 16, 16, 0.0, family.shared_lora_down(model))
    return family, model, params


def sdxl_tiny_unet() -> dict:
    return dict(
        tiny.TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=(1, 2),
    )


def training_batch(arch: str, model, size: int, device: str, smoke: bool):
    import torch

    from fastbackend.training.families import TrainingBatch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if arch == "flux":
        text = torch.randn(1, 16 if smoke else 512, model.config.joint_attention_dim)
        cond = {"prompt_embeds": text, "pooled": torch.randn(1, model.config.pooled_projection_dim)}
        channels = model.config.in_channels // 4
    else:
        cond = {
            "prompt_embeds": torch.randn(1, 77, model.config.cross_attention_dim),
            "pooled": torch.randn(1, 32 if smoke else 1280),
        }
        channels = model.config.in_channels
    return TrainingBatch(
        latents=torch.randn(1, channels, size // 8, size // 8, device=device, dtype=dtype),
        cond={key: value.to(device, dtype) for key, value in cond.items()},
        sizes=torch.tensor([[size, size, 0, 0, size, size]]),
    )


def full_size(arch: str, device: str, size: int, updates: int, quantize: bool, checkpointing: bool, smoke: bool):
    """Seconds per micro-batch and per optimizer step, and peak memory, of one LoRA set-up."""
    import torch
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from fastbackend.training.families import LossOptions
    from fastbackend.training.setup import make_optimizer

    family, model, params = denoiser(arch, device, smoke, quantize and device.startswith("cuda"))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    train_cfg = plan_process(arch, size, quantize, checkpointing).train
    optimizer = make_optimizer(train_cfg, params, torch.device(device), [])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if arch == "flux" else DDPMScheduler()
    options = LossOptions(scheduler=scheduler)
    batch = training_batch(arch, model, size, device, smoke)
    cuda = device.startswith("cuda")
    micro, update = [], []
    for index in range(updates + 1):  # the first update warms up (kernels, allocator) and is not counted
        if index == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(ACCUMULATE):
            one = time.perf_counter()
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                loss = family.loss(None, model, batch, options)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if index:
                micro.append(time.perf_counter() - one)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if index:
            update.append(time.perf_counter() - started)
    peaks = (torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9) if cuda else (0.0, 0.0)
    del model, optimizer, params
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(micro), statistics.median(update), peaks


def plan_process(arch: str, size: int, quantize: bool, checkpointing: bool):
    """The user's YAML as this check runs it: one resolution, no EMA or samples, adamw8bit, bf16."""
    from fastbackend.config import parse_training_config

    text = (Path(__file__).resolve().parent.parent / "examples" / "training.yaml").read_text()
    config, _ = parse_training_config(text)
    process = config.process
    process.model.arch, process.model.is_flux = arch, arch == "flux"
    process.model.quantize, process.train.gradient_checkpointing = quantize, checkpointing
    process.train.ema_config.use_ema, process.sample = False, None
    process.datasets[0].resolution = [size]
    return process


def plan_gb(arch: str, size: int, quantize: bool, checkpointing: bool) -> float:
    from fastbackend.training.families import family_for
    from fastbackend.training.memory_plan import plan_run

    process = plan_process(arch, size, quantize, checkpointing)
    return plan_run(process, family_for(arch).reference_model, None).phases["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script itself")
    parser.add_argument("--updates", type=int, default=3, help="timed optimizer steps per setting")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda:0"
    print(environment(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["FASTBACKEND_DATA_DIR"] = str(root)
    upload_dataset()
    tiny_runs(device, root)
    if not args.smoke:
        print(int8_paths_active(device, root), flush=True)
        print(host_syncs(device, root), flush=True)
    size = 64 if args.smoke else 1024
    print(f"\nLoRA rank 16, {size} px, batch 1, adamw8bit, {ACCUMULATE} micro-batches per optimizer step")
    header = f"{'model':<7}{'8-bit':<7}{'ckpt':<6}{'s/micro':>9}{'s/update':>10}{'alloc GB':>10}{'reserved GB':>13}"
    print(header + f"{'plan GB':>9}{'plan/alloc':>12}", flush=True)
    for arch in ("flux", "sdxl"):
        for quantize, checkpointing in SETTINGS:
            micro, update, (allocated, reserved) = full_size(
                arch, device, size, args.updates, quantize, checkpointing, args.smoke
            )
            planned = plan_gb(arch, 1024, quantize, checkpointing)
            ratio = f"{planned / allocated:>12.2f}" if allocated else f"{'-':>12}"
            flags = f"{arch:<7}{'yes' if quantize else 'no':<7}{'on' if checkpointing else 'off':<6}"
            print(f"{flags}{micro:>9.3f}{update:>10.3f}{allocated:>10.1f}{reserved:>13.1f}{planned:>9.1f}{ratio}")


if __name__ == "__main__":
    main()
