"""Everything before the first step: device, precision, the base model, data, LoRA layers, optimizer.

``set_up(job, hooks)`` returns a ``Run``, saying through ``hooks.on_stage`` when it loads the
model (with download progress) and caches; the config was checked by ``config`` before anything
here runs, so what can still go wrong is the hardware (falls back to the CPU with a warning) and the
model (``model_load_failed``).
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastbackend import hub_fetch, stopping
from fastbackend.config import PREFIX, ModelConfig, ProcessConfig, TrainConfig
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.storage import cached_hub_file, download_cache_dir, hub_file
from fastbackend.training import lora_io
from fastbackend.training.caching import prepare_data
from fastbackend.training.families import Family, LossOptions, family_for
from fastbackend.training.families.base import move_to
from fastbackend.training.run import Hooks, Run, TrainJob

log = logging.getLogger("fastbackend.trainer")
MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}
# ai-toolkit's optimizer setting where it differs from the libraries' (toolkit/optimizer.py):
# eps 1e-6 for the Adam family and Prodigy.
ADAM_EPS = 1e-6
# ai-toolkit's warm-up for constant_with_warmup when none is given (toolkit/scheduler.py).
DEFAULT_WARMUP_STEPS = 1000
PROCESS_GROUP_TIMEOUT_S = 2 * 3600  # a round of FLUX samples at 1024 px takes minutes


def set_up(job: TrainJob, hooks: Hooks | None = None) -> Run:
    hooks = hooks or Hooks()
    process = job.config.process
    train_cfg = process.train
    device, weight_dtype = choose_device(process.device, train_cfg.dtype, job.warnings)
    accelerator = make_accelerator(device, weight_dtype)
    seed = seed_torch(process)
    family = family_for(process.model.resolved_arch, process.model.is_v_pred)
    pipe = load_pipeline(family, process.model, job, (device, weight_dtype), hooks)
    text_encoders = family.trainable_text_encoders(pipe) if train_cfg.train_text_encoder else {}
    hooks.on_stage({"stage": "caching", "datasets": len(job.dataset_folders)})
    texts, sampler, digest = prepare_data(
        family,
        pipe,
        process,
        job.dataset_folders,
        job.base_model,
        device,
        random.Random(seed),
        bool(text_encoders),
        job.warnings,
        stopping.stop_check("caching latents and captions", hooks.should_stop),
    )
    moving = stopping.stop_check("moving the base model", hooks.should_stop)
    denoiser = move_to(family.denoiser(pipe), device, moving)  # after caching: the encoders may have left by now
    modules = {family.denoiser_name: denoiser} | text_encoders
    groups = [lora_group(name, module, family, process) for name, module in modules.items()]
    params = [param for group in groups for param in group["params"]]
    if train_cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if train_cfg.compile or process.model.compile:
        field = f"{PREFIX}.{'train' if train_cfg.compile else 'model'}.compile"
        compile_blocks(denoiser, family, process.model.quantize, job.warnings, field)
    optimizer = accelerator.prepare(make_optimizer(train_cfg, groups, device, job.warnings))
    return Run(
        job=job,
        family=family,
        pipe=pipe,
        denoiser=denoiser,
        lora_modules=modules,
        params=params,
        accelerator=accelerator,
        optimizer=optimizer,
        lr_scheduler=make_lr_scheduler(train_cfg, optimizer),
        ema=make_ema(train_cfg, params),
        sampler=sampler,
        texts=texts,
        loss_options=LossOptions(
            scheduler=family.training_scheduler(pipe),
            timestep_type="shift" if train_cfg.timestep_type == "flux_shift" else train_cfg.timestep_type or "sigmoid",
            linear_timesteps=train_cfg.linear_timesteps,
            content_or_style=train_cfg.content_or_style,
            noise_offset=train_cfg.noise_offset,
            min_snr_gamma=train_cfg.min_snr_gamma,
        ),
        rng=random.Random(seed + 1),
        dataset_hash=digest,
        weight_dtype=weight_dtype,
        trains_text_encoder=bool(text_encoders),
    )


def seed_torch(process: ProcessConfig) -> int:
    """Seed torch with ``train.seed``, else ``training_seed``, else a fresh one; returns it."""
    seed = next((s for s in (process.train.seed, process.training_seed) if s is not None), None)
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def lora_group(name: str, module: torch.nn.Module, family: Family, process: ProcessConfig) -> dict:
    """LoRA layers added to one module, as an optimizer parameter group (train.lr for every module,
    as ai-toolkit's; gradients are clipped per group, as its are)."""
    is_denoiser = name == family.denoiser_name
    network = process.network
    targets = family.lora_targets(module) if is_denoiser else family.text_encoder_lora_targets(module)
    shared = family.shared_lora_down(module) if is_denoiser else []
    params = lora_io.add_lora(module, targets, network.rank, process.lora_alpha, network.dropout or 0.0, shared)
    module.train()
    return {"params": params, "lr": process.train.lr}


def compile_blocks(denoiser: torch.nn.Module, family: Family, quantized: bool, warnings: list[str], field: str) -> None:
    """torch.compile each of the denoiser's repeated blocks, LoRA layers included. The first steps
    (and the first of each new bucket size) pay the compilation; the rest run the fused kernels."""
    if denoiser.device.type == "cuda" and not (shutil.which("cc") or shutil.which("gcc")):
        warnings.append(f"{field}: torch.compile needs a C compiler for its GPU kernels and none is here; not compiled")
        return
    blocks = [module for module in denoiser.modules() if type(module).__name__ in family.compiled_blocks]
    for block in blocks:
        block.compile()
    note = "; the 8-bit layers break its graphs, so quantize: true gains less from it" if quantized else ""
    warnings.append(f"{field}: {len(blocks)} blocks compiled with torch.compile{note}")


def choose_device(requested: str, dtype_name: str, warnings: list[str]) -> tuple[torch.device, torch.dtype]:
    """The config's device when it exists here, else the CPU; half precision only on CUDA."""
    if requested.startswith("cuda") and torch.cuda.is_available() and cuda_index(requested) < torch.cuda.device_count():
        device = torch.device(requested)
    else:
        if requested != "cpu":
            warnings.append(f"{PREFIX}.device: {requested!r} is not available here; training on the CPU")
        device = torch.device("cpu")
    dtype = lora_io.TORCH_DTYPES[dtype_name]
    if device.type == "cpu" and dtype != torch.float32:
        warnings.append(f"{PREFIX}.train.dtype: {dtype_name} needs CUDA; training in fp32 on the CPU")
        dtype = torch.float32
    return device, dtype


def cuda_index(requested: str) -> int:
    return torch.device(requested).index or 0


def make_accelerator(device: torch.device, weight_dtype: torch.dtype):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one state per process and refuses a second Accelerator with another
    # precision; a worker trains job after job, each with its own settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # With several processes (distributed.py), the others wait while the main one samples or saves.
    patience = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    return Accelerator(
        mixed_precision=MIXED_PRECISION[weight_dtype], cpu=device.type == "cpu", kwargs_handlers=[patience]
    )


def load_pipeline(
    family: Family, model_cfg: ModelConfig, job: TrainJob, placement: tuple[torch.device, torch.dtype], hooks: Hooks
):
    """The base pipeline, frozen, its encoders on the device (the denoiser follows after caching, so
    the two never share the device unless steps need the encoders); with ``quantize``, the
    denoiser's LoRA-target layers hold 8-bit weights (bitsandbytes LLM.int8, on CUDA and the CPU);
    with a training adapter, that on the denoiser. A first run downloads the model here, its bytes
    reported through ``hooks``; a stop ends the download or the load."""
    device, dtype = placement
    hooks.on_stage({"stage": "loading_model", "model": model_cfg.name_or_path})
    quantize = model_cfg.quantize and bitsandbytes_available()
    if model_cfg.quantize and not quantize:
        job.warnings.append(
            f"{PREFIX}.model.quantize: 8-bit base weights need bitsandbytes; the base model is kept in full precision"
        )
    elif quantize:
        job.warnings.append(
            f"{PREFIX}.model.quantize: the denoiser's base weights are bitsandbytes 8-bit (LLM.int8); "
            "ai-toolkit quantizes to qfloat8 (optimum-quanto), so the numerics differ slightly"
        )
    log.info("loading %s model %s (%s, %s)", family.name, model_cfg.name_or_path, device, dtype)
    pipe = family.load(
        job.base_model,
        dtype,
        str(download_cache_dir()),
        model_cfg.revision,
        field=f"{PREFIX}.model.name_or_path",
        shown=model_cfg.name_or_path,
        notes=job.warnings,
        report=lambda got, total: hooks.on_stage(
            {"stage": "loading_model", "model": job.base_model, "downloaded_bytes": got, "total_bytes": total}
        ),
        should_stop=hooks.should_stop,
    )
    job.warnings.extend(family.checkpoint_warnings(pipe, model_cfg.name_or_path))
    for module in [family.denoiser(pipe), *family.encoders(pipe)]:
        module.requires_grad_(False)  # only LoRA layers train
    if quantize:
        quantize_8bit(family.denoiser(pipe), family.lora_targets(family.denoiser(pipe)))
    if job.assistant_lora is not None:
        load_assistant(pipe, family, job.assistant_lora, hooks.should_stop)
    check = stopping.stop_check("moving the base model", hooks.should_stop)
    for name, component in pipe.components.items():  # the encoders, and a safety checker where there is one
        if isinstance(component, torch.nn.Module) and name != family.denoiser_name:
            move_to(component, device, check)
    return pipe


def load_assistant(pipe, family: Family, reference: str, should_stop: Callable[[], bool]) -> None:
    """The config's training adapter on the denoiser (downloaded first when it is a hub file)."""
    field = f"{PREFIX}.model.assistant_lora_path"
    # storage.resolve_lora_file makes a local file absolute; anything else names a hub file
    path = reference if Path(reference).is_absolute() else download_hub_file(reference, field, should_stop)
    try:
        lora_io.add_assistant(pipe, family.denoiser(pipe), path)
    except Exception as exc:
        raise FastBackendError(
            f"{field}: {reference!r} could not be loaded as a {family.name} LoRA: {exc}",
            code=ErrorCode.MODEL_LOAD_FAILED,
        ) from exc
    log.info("training adapter %s on while training, off for samples", reference)


def download_hub_file(reference: str, field: str, should_stop: Callable[[], bool]) -> str:
    """The local path of hub file ``reference`` (``owner/repo/file``), downloaded when no cache has it."""
    repo_id, filename = hub_file(reference)
    if (found := cached_hub_file(repo_id, filename)) is not None:  # already there: no download, no network
        return str(found[1])
    cache = download_cache_dir()
    folder = hub_fetch.fetch(repo_id, None, [filename], cache, field, should_stop=should_stop, shown=repr(reference))
    return str(folder / filename)


def quantize_8bit(module: torch.nn.Module, targets: list[str]) -> None:
    """Swap the ``targets`` linear layers of ``module`` for bitsandbytes 8-bit ones (LLM.int8
    with its outlier threshold 6.0, diffusers' default; ``int8.FrozenLinear8bit``, which keeps
    nothing for the backward pass): the base weights the LoRA adapts take a byte per parameter.
    peft puts its LoRA layers on them as on diffusers' own 8-bit loading."""
    import bitsandbytes as bnb

    from fastbackend.training.int8 import FrozenLinear8bit

    # LLM.int8 quantizes activations from fp16; bitsandbytes says so on every matmul of a bf16 or
    # fp32 model (thousands of lines a step). Said once, in the run's warnings, is enough.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if not isinstance(linear, torch.nn.Linear):
            continue
        quantized = FrozenLinear8bit(  # on the meta device: no throw-away init, no draw from the run's RNG
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        quantized.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, quantized)


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def make_optimizer(train_cfg: TrainConfig, params: list, device: torch.device, warnings: list[str]):
    """The configured optimizer over ``params`` (parameters, or groups with their own lr).

    ``optimizer_params`` were checked against the optimizer with the config.
    """
    name: str = train_cfg.optimizer
    options: dict[str, Any] = ({} if name == "sgd" else {"eps": ADAM_EPS}) | train_cfg.optimizer_params
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    lr = train_cfg.lr
    if name in ("adamw8bit", "adam8bit"):
        if bitsandbytes_available():  # on CUDA and on the CPU: 8-bit state for tensors of 4096+ values
            import bitsandbytes as bnb

            return (bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Adam8bit)(params, lr=lr, **options)
        fallback = "adamw" if name == "adamw8bit" else "adam"
        shown = "AdamW" if fallback == "adamw" else "Adam"
        warnings.append(f"{PREFIX}.train.optimizer: {name} needs bitsandbytes; using {shown}")
        name = fallback
    if name == "prodigy":
        from prodigyopt import Prodigy

        # ai-toolkit passes lr 1.0 to Prodigy when train.lr is below 0.1, but its parameter groups
        # carry train.lr, which wins: Prodigy runs at train.lr there, and so it does here.
        return Prodigy(params, lr=lr, **options)
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    return optimizer_class(params, lr=lr, **options)


def make_lr_scheduler(train_cfg: TrainConfig, optimizer):
    """The learning-rate schedule over ``steps``, advanced once per step, as ai-toolkit's
    (toolkit/scheduler.py).

    "linear" is torch's LinearLR as ai-toolkit builds it: a ramp *up* from lr/3 to lr (its
    start_factor/end_factor are lr_scheduler_params). "cosine" is ai-toolkit's own: a linear warm-up
    over ``num_warmup_steps`` (default none), then a cosine over ``cosine_decay_steps`` (default
    ``steps``, counted after the warm-up) down to ``eta_min``. "constant_with_warmup" warms up over
    ``num_warmup_steps``, else ai-toolkit's 1000. ``lr_warmup_steps`` is not an ai-toolkit key
    (``config`` warns that it is unused).
    """
    params = dict(train_cfg.lr_scheduler_params)
    if train_cfg.lr_scheduler == "linear":
        return torch.optim.lr_scheduler.LinearLR(
            optimizer,
            start_factor=params.get("start_factor", 1 / 3),
            end_factor=params.get("end_factor", 1.0),
            total_iters=train_cfg.steps,
        )
    if train_cfg.lr_scheduler == "cosine":
        return cosine_schedule(optimizer, train_cfg.steps, params)
    from diffusers.optimization import get_scheduler

    default = DEFAULT_WARMUP_STEPS if train_cfg.lr_scheduler == "constant_with_warmup" else 0
    warmup = int(params.get("num_warmup_steps", default))
    shape = {key: params[key] for key in ("num_cycles", "power") if key in params}
    return get_scheduler(
        train_cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=train_cfg.steps, **shape
    )


def cosine_schedule(optimizer, steps: int, params: dict):
    """ai-toolkit's cosine: up from 0 over the warm-up, then down to ``eta_min`` over the decay steps."""
    warmup = int(params.get("num_warmup_steps", 0))
    decay = min(int(params.get("cosine_decay_steps", steps)), steps)
    floor = float(params.get("eta_min", 0.0)) / max(1e-8, optimizer.param_groups[0]["lr"])

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, decay))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(train_cfg: TrainConfig, params: list[torch.nn.Parameter]):
    """ai-toolkit's EMA: a constant decay from the first update, no warm-up (toolkit/ema.py).

    diffusers' EMAModel warms its decay up as (1 + n) / (10 + n) unless min_decay holds it at
    ``ema_decay``; update_after_step -1 makes the very first update use that decay too.
    """
    if not train_cfg.ema_config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    decay = train_cfg.ema_config.ema_decay
    return EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1)


def log_run_shape(run: Run) -> None:
    """The shape of the run, once at its start: what trains, on what, for how long."""
    train_cfg = run.process.train
    trainable = sum(p.numel() for p in run.params)
    layers = sum(
        1
        for module in run.lora_modules.values()
        for name, _ in module.named_modules()
        if name.endswith(f"lora_A.{lora_io.ADAPTER}")
    )
    log.info(
        "training %s LoRA on %s: rank %d, %d layers, %s trainable parameters, %d examples in %d buckets, "
        "batch %d x %d accumulation, steps %d (from %d), lr %g",
        run.family.name,
        ", ".join(run.lora_modules),
        run.process.network.rank,
        layers,
        f"{trainable:,}",
        len(run.sampler.examples),
        len(run.sampler.buckets),
        train_cfg.batch_size,
        train_cfg.gradient_accumulation_steps,
        train_cfg.steps,
        run.step,
        train_cfg.lr,
    )
