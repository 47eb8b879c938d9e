"""The GPU check, for a session that has a GPU: one prepared run of 6 to 7 minutes.

It imports the training core only (no handler, no runpod), so the lent machine needs just the
wheels it lacks (``benchmarks/gpu_bundle.sh`` builds them into ``gpu_wheels/``, which the device
tool carries). Then, in one command there:

    pip install --no-index --find-links gpu_wheels diffusers bitsandbytes pydantic prodigyopt \
        && python3 -m benchmarks.gpu_check

1. The tiny FLUX / SDXL / SD 1.5 pipelines trained on the GPU with the user's settings (bf16,
   adamw8bit, ``quantize``, gradient checkpointing): no run may say that any of them fell back,
   and the 8-bit layers and optimizer must really be the ones training.
2. Full-size random-weight denoisers (their published configs in training/shapes/, no download, built
   in bf16 straight on the GPU) with a rank-16 LoRA through each family's own ``loss`` at 1024 px,
   bf16 autocast, adamw8bit, 4 micro-batches per optimizer step (the user's YAML), one warm-up
   micro-batch and 2 timed optimizer steps each: seconds per micro-batch and per optimizer step,
   peak memory allocated and reserved, and the memory plan's training-phase estimate beside them
   (its activation constants were measured on the CPU only). Batches are random latents in the
   layout each family's ``scale_latents`` returns and random captions shaped like its
   ``encode_prompt`` output (no text encoder loads); the noise schedulers are the published
   pipelines'. Rows (8-bit base weights / checkpointing), in the order they run:
   FLUX.1-dev, SDXL, FLUX.2 [klein] 4B, Z-Image and Qwen-Image: bf16 without and with
   checkpointing, 8-bit with; FLUX.2 [klein] 9B: bf16 and 8-bit with checkpointing; FLUX.2 [dev]
   (32B, 70 GB planned): bf16 with checkpointing. A row that fails (out of memory, say) prints why
   and the next runs; no row starts after ``--budget`` seconds (420), so the command ends inside
   its 10 minutes even when the GPU is slower than estimated.
3. Host syncs per trainer step (CUDA's sync debug mode, tiny FLUX): the aim is the one loss read.

Time on an H200, estimated (none has run yet): installing the wheels and parts 1 and 3, 1 to 2
minutes. Part 2, from its FLOPs (forward about 2 x parameters x tokens plus attention; a LoRA
step about 3 forwards, 4 with checkpointing) at about 500 TFLOP/s: seconds per checkpointed
micro-batch about 1.0 FLUX.1, 0.35 klein 4B, 0.55 Z-Image, 1.5 Qwen-Image, 0.75 klein 9B, 2.6
FLUX.2 [dev], bitsandbytes' 8-bit matmuls perhaps twice that; each row 9 micro-batches, a few
seconds of random init, and for 8-bit rows the bf16 weights' trip to the host and back to be
quantized (about 1 s per 2 GB: 20 s for Qwen-Image). About 5 minutes: FLUX.1 55 s, SDXL 10,
klein 4B 25, Z-Image 35, Qwen-Image 80, klein 9B 35, [dev] 35. So about 6 to 7 minutes in all;
give the command ``timeout_s`` 590. The ``row s`` column reports each row's real seconds.

    .venv/bin/python -m benchmarks.gpu_check --smoke      # on a CPU: tiny shapes, to check the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
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


def tiny_runs(device: str, root: Path) -> list[str]:
    """Each tiny architecture trained with the user's CUDA settings: nothing may fall back. What did
    is returned (and the run fails at its end), so one try on a lent machine still measures the rest."""
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest

    print(f"{'tiny model':<12}{'s':>7}{'final loss':>12}  warnings")
    fell_back: list[str] = []
    for arch in ("flux", "sdxl", "sd15"):
        folder = tiny.build(arch, root / "models" / arch)
        text = tiny_config(str(folder), arch, steps=6).replace("device: cuda:0", f"device: {device}")
        started = time.perf_counter()
        answer = train_with_yaml(TrainWithYamlRequest(type="train_with_yaml", yaml_config=text, resume=False))
        print(f"{arch:<12}{time.perf_counter() - started:>7.1f}{answer['final_loss']:>12.4f}  {answer['warnings']}")
        if device != "cpu":
            fell_back += [f"{arch}: {w}" for w in answer["warnings"] if any(f in w for f in FALLBACKS)]
    return fell_back


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


# The full-size rows, in the order they run: (arch, settings). No row starts past --budget seconds,
# so the last are the ones to lose. FLUX.2 [klein] 9B and [dev] share klein 4B's activation constants
# (its rows check those without checkpointing), so their checkpointed rows suffice; [dev] (32B) runs
# bf16 only, its 8-bit set-up would move 64 GB of weights to the host and back.
CHECKPOINTED = ((False, True), (True, True))
FULL_SIZE = (
    ("flux", SETTINGS),
    ("sdxl", SETTINGS),
    ("flux2_klein_4b", SETTINGS),
    ("zimage", SETTINGS),
    ("qwen_image", SETTINGS),
    ("flux2_klein_9b", CHECKPOINTED),
    ("flux2", ((False, True),)),
)
FLOW = "FlowMatchEulerDiscreteScheduler"
# The schedulers the published pipelines ship (as devtools/tiny.py builds them), for the families'
# own training_scheduler to copy or replace; no pipeline is loaded.
PIPELINE_SCHEDULERS = {
    "flux": (FLOW, {}),  # unread: FLUX.1 trains with FLUX.1-dev's settings whatever the pipeline's
    "sdxl": (
        "EulerDiscreteScheduler",
        {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1},
    ),
    "zimage": (FLOW, {"shift": 3.0, "use_dynamic_shifting": False}),
    "qwen_image": (FLOW, tiny.QWEN_IMAGE_SCHEDULER),
    "flux2_klein_4b": (FLOW, {"shift": 3.0, "use_dynamic_shifting": True}),
    "flux2_klein_9b": (FLOW, {"shift": 3.0, "use_dynamic_shifting": True}),
    "flux2": (FLOW, {"shift": 3.0, "use_dynamic_shifting": True}),
}


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
        config = tiny_denoiser_config(arch)
    else:
        config = json.loads((SHAPES / arch / family.denoiser_name / "config.json").read_text())
        config.pop("_class_name")
    model_class = getattr(diffusers, family.denoiser_class_name)
    cuda = device.startswith("cuda")
    # Built in bf16 straight on the GPU: random init there takes seconds even for 32B parameters.
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


def tiny_denoiser_config(arch: str) -> dict:
    """devtools/tiny.py's denoiser of ``arch`` (SDXL's UNet as its tiny pipeline builds it)."""
    if arch == "sdxl":
        return sdxl_tiny_unet()
    configs = {
        "flux": tiny.TINY_FLUX_TRANSFORMER,
        "zimage": tiny.TINY_ZIMAGE_TRANSFORMER,
        "qwen_image": tiny.TINY_QWEN_IMAGE_TRANSFORMER,
        "flux2_klein_4b": tiny.TINY_FLUX2_TRANSFORMER,
        "flux2_klein_9b": tiny.TINY_FLUX2_TRANSFORMER,
        "flux2": tiny.TINY_FLUX2_TRANSFORMER | {"guidance_embeds": True},  # [dev] embeds its guidance
    }
    return dict(configs[arch])


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


def caption_shapes(arch: str) -> tuple[str, int, bool]:
    """How ``arch``'s encode_prompt output looks: the denoiser config's field for its width, its
    tokens at full size (the memory plan's count, so the two measure the same thing), and whether
    a mask rides along (Z-Image and Qwen-Image cache captions padded, with their mask)."""
    from fastbackend.training.families import flux, flux2, qwen_image, zimage

    return {
        "flux": ("joint_attention_dim", flux.FLUX_DEV_MAX_SEQUENCE, False),
        "sdxl": ("cross_attention_dim", 77, False),
        "zimage": ("cap_feat_dim", zimage.MAX_SEQUENCE, True),
        "qwen_image": ("joint_attention_dim", qwen_image.TEXT_TOKENS, True),
        "flux2_klein_4b": ("joint_attention_dim", flux2.MAX_SEQUENCE, False),
        "flux2_klein_9b": ("joint_attention_dim", flux2.MAX_SEQUENCE, False),
        "flux2": ("joint_attention_dim", flux2.MAX_SEQUENCE, False),
    }[arch]


def caption(arch: str, config, smoke: bool) -> dict:
    """Random caption features shaped like the family's encode_prompt output: no text encoder loads."""
    import torch

    width_field, tokens, masked = caption_shapes(arch)
    tokens = 16 if smoke else tokens
    cond = {"prompt_embeds": torch.randn(1, tokens, config[width_field])}
    if masked:
        cond["prompt_mask"] = torch.ones(1, tokens)
    if arch == "flux":
        cond["pooled"] = torch.randn(1, config["pooled_projection_dim"])
    if arch == "sdxl":  # text_encoder_2's projection: what the added embedding takes beside 6 size embeddings
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        cond["pooled"] = torch.randn(1, pooled)
    return cond


def latents_shape(arch: str, config, size: int) -> tuple[int, int, int, int]:
    """What the family's scale_latents returns for one ``size`` x ``size`` image."""
    if arch.startswith("flux2"):  # 2x2 patches of the VAE's latents, 4x the channels at 1/16
        return (1, config["in_channels"], size // 16, size // 16)
    if arch in ("flux", "qwen_image"):  # the VAE's latents at 1/8; the loss packs 2x2 patches into in_channels
        return (1, config["in_channels"] // 4, size // 8, size // 8)
    return (1, config["in_channels"], size // 8, size // 8)  # SDXL; Z-Image patches inside the model


def training_batch(arch: str, model, size: int, device: str, smoke: bool):
    import torch

    from fastbackend.training.families import TrainingBatch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = dict(model.config)
    return TrainingBatch(  # cast as the trainer casts its cached captions: masks too
        latents=torch.randn(latents_shape(arch, config, size), device=device, dtype=dtype),
        cond={key: value.to(device, dtype) for key, value in caption(arch, config, smoke).items()},
        sizes=torch.tensor([[size, size, 0, 0, size, size]]),
    )


def loss_options(family, arch: str):
    """The family's own training scheduler, given a stand-in pipeline that holds only the published one."""
    from types import SimpleNamespace

    import diffusers

    from fastbackend.training.families import LossOptions

    name, config = PIPELINE_SCHEDULERS[arch]
    scheduler = getattr(diffusers, name)(**config)
    return LossOptions(scheduler=family.training_scheduler(SimpleNamespace(scheduler=scheduler)))


def full_size(arch: str, device: str, size: int, updates: int, quantize: bool, checkpointing: bool, smoke: bool):
    """Seconds per micro-batch and per optimizer step, and peak memory, of one LoRA set-up."""
    import torch

    from fastbackend.training.setup import make_optimizer

    family, model, params = denoiser(arch, device, smoke, quantize and device.startswith("cuda"))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    train_cfg = plan_process(arch, size, quantize, checkpointing).train
    optimizer = make_optimizer(train_cfg, params, torch.device(device), [])
    batch = training_batch(arch, model, size, device, smoke)
    micro, update = timed_updates(family, model, batch, loss_options(family, arch), optimizer, updates, device)
    cuda = device.startswith("cuda")
    peaks = (torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9) if cuda else (0.0, 0.0)
    return statistics.median(micro), statistics.median(update), peaks


def timed_updates(family, model, batch, options, optimizer, updates: int, device: str):
    """Each micro-batch's and each optimizer step's seconds, through the family's own loss (``pipe``
    is None: no loss here reads the pipeline, only its static methods)."""
    import torch

    cuda = device.startswith("cuda")
    micro, update = [], []
    # Update 0 warms up (kernels, allocator, optimizer state) on one micro-batch and is not counted.
    for index in range(updates + 1):
        if index == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(ACCUMULATE if index else 1):
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
    return micro, update


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


def measured_row(arch: str, device: str, size: int, updates: int, setting: tuple[bool, bool], smoke: bool) -> str:
    """One row's figures, or why it has none: a failure (an out-of-memory most likely) costs that
    row only, since the lent machine gives one try. The smoke run lets it raise."""
    import gc

    import torch

    quantize, checkpointing = setting
    planned = plan_gb(arch, 1024, quantize, checkpointing)
    started = time.perf_counter()
    try:
        micro, update, (allocated, reserved) = full_size(arch, device, size, updates, quantize, checkpointing, smoke)
    except Exception as exc:
        if smoke:
            raise
        figures = f"  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        figures = f"{figures} (plan {planned:.1f} GB)"
    else:
        ratio = f"{planned / allocated:>12.2f}" if allocated else f"{'-':>12}"
        figures = f"{micro:>9.3f}{update:>10.3f}{allocated:>10.1f}{reserved:>13.1f}{planned:>9.1f}{ratio}"
        figures += f"{time.perf_counter() - started:>7.0f}"
    gc.collect()  # the model, its LoRA and optimizer (held by a failure's traceback until now)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return figures


def full_size_table(device: str, size: int, updates: int, smoke: bool, deadline: float) -> None:
    print(f"\nLoRA rank 16, {size} px, batch 1, adamw8bit, {ACCUMULATE} micro-batches per optimizer step")
    header = f"{'model':<16}{'8-bit':<7}{'ckpt':<6}{'s/micro':>9}{'s/update':>10}{'alloc GB':>10}{'reserved GB':>13}"
    print(header + f"{'plan GB':>9}{'plan/alloc':>12}{'row s':>7}", flush=True)
    for arch, settings in FULL_SIZE:
        for quantize, checkpointing in settings:
            flags = f"{arch:<16}{'yes' if quantize else 'no':<7}{'on' if checkpointing else 'off':<6}"
            if time.monotonic() > deadline:  # what is left would not end inside the command's limit
                print(f"{flags}  skipped: past --budget", flush=True)
                continue
            print(flags + measured_row(arch, device, size, updates, (quantize, checkpointing), smoke), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script itself")
    parser.add_argument("--updates", type=int, default=2, help="timed optimizer steps per setting")
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds after which no full-size row starts (one command: 600)"
    )
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    device = "cpu" if args.smoke else "cuda:0"
    print(environment(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["FASTBACKEND_DATA_DIR"] = str(root)
    upload_dataset()
    fell_back = tiny_runs(device, root)
    if not args.smoke:
        print(int8_paths_active(device, root), flush=True)
        print(host_syncs(device, root), flush=True)
    full_size_table(device, 64 if args.smoke else 1024, args.updates, args.smoke, deadline)
    if fell_back:
        sys.exit("FELL BACK on the GPU: " + "; ".join(fell_back))


if __name__ == "__main__":
    main()
