"""The LoRA training loop: typed config in, LoRA files out, progress through hooks.

``train(job, hooks)`` reads top to bottom: set up the device, load the model, cache latents and
caption embeddings (then move the encoders off the device), add LoRA layers, resume from the
newest saved state if there is one, and run ``steps`` optimizer steps of
``batch_size x gradient_accumulation_steps`` examples, saving and sampling on schedule. A
non-finite loss stops the run with its step number; the last good save stays.

The core never imports runpod: the handler turns ``hooks.on_step`` into progress updates.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastbackend.config import TrainingConfig
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.storage import atomic_write_bytes, hf_cache_dir, temporary_path
from fastbackend.training import data, lora_io
from fastbackend.training.models import TEXT_ENCODER_TARGETS, Arch, Batch, LossOptions, arch_for

log = logging.getLogger("fastbackend.trainer")
STATE_FILE = "training_state.pt"
LOSS_HISTORY_POINTS = 100
WEIGHT_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}


@dataclass
class TrainJob:
    """Everything the loop needs, resolved and checked by the caller."""

    config: TrainingConfig
    model_source: str  # a local folder or a hub id
    dataset_folders: list[Path]
    output: Path  # <root>/output/<name>
    resume: bool = True
    warnings: list[str] = field(default_factory=list)


@dataclass
class Hooks:
    on_step: Callable[[dict], None] = lambda info: None
    on_save: Callable[[Path], None] = lambda path: None
    on_sample: Callable[[list[Path]], None] = lambda paths: None


@dataclass
class TrainResult:
    lora_path: Path
    sha256: str
    steps: int
    final_loss: float | None
    loss_history: list[list[float]]  # [[step, loss], ...], at most LOSS_HISTORY_POINTS
    duration_s: float
    samples: list[Path]
    saves: list[Path]
    resumed_from: int
    warnings: list[str]


class NonFiniteLoss(FastBackendError):
    code = ErrorCode.NON_FINITE_LOSS


@dataclass
class Run:
    """The live state of one training run."""

    job: TrainJob
    arch: Arch
    pipe: object
    denoiser: torch.nn.Module
    lora_modules: lora_io.Components  # the denoiser, and the text encoders when they train too
    params: list[torch.nn.Parameter]
    accelerator: object
    optimizer: object
    lr_scheduler: object
    ema: object | None
    sampler: data.BucketSampler
    texts: "TextCache"
    loss_options: LossOptions
    rng: random.Random
    dataset_hash: str
    weight_dtype: torch.dtype = torch.float32  # of the base weights; inputs are cast to it
    trains_text_encoder: bool = False
    step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    saves: list[Path] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- entry point


def train(job: TrainJob, hooks: Hooks | None = None) -> TrainResult:
    hooks = hooks or Hooks()
    started = time.monotonic()
    run = set_up(job)
    resumed_from = restore_state(run) if job.resume else 0
    log_run_shape(run)
    total = job.config.process.train.steps
    progress = _progress_bar(total, resumed_from)
    while run.step < total:
        step_started = time.monotonic()
        loss = optimizer_step(run)
        run.step += 1
        run.history.append((run.step, loss))
        report_step(run, hooks, loss, time.monotonic() - step_started, progress)
        if run.step % job.config.process.save.save_every == 0 and run.step < total:
            save_checkpoint(run, hooks, final=False)
        if should_sample(run, total):
            hooks.on_sample(sample(run))
    if progress is not None:
        progress.close()
    final = save_checkpoint(run, hooks, final=True)
    if should_sample(run, total, final=True):
        hooks.on_sample(sample(run))
    return TrainResult(
        lora_path=final,
        sha256=run.sha256[final.name],
        steps=run.step,
        final_loss=run.history[-1][1] if run.history else None,
        loss_history=downsample(run.history),
        duration_s=round(time.monotonic() - started, 2),
        samples=run.samples,
        saves=run.saves,
        resumed_from=resumed_from,
        warnings=job.warnings,
    )


# ---------------------------------------------------------------- set-up


def set_up(job: TrainJob) -> Run:
    process = job.config.process
    train_cfg = process.train
    device, weight_dtype = choose_device(process.device, train_cfg.dtype, job.warnings)
    accelerator = make_accelerator(device, weight_dtype)
    seed = train_cfg.seed if train_cfg.seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    arch = arch_for(process.model.resolved_arch, process.model.is_v_pred)
    pipe = load_pipeline(arch, job, device, weight_dtype)
    text_encoders = arch.trainable_text_encoders(pipe) if train_cfg.train_text_encoder else {}
    texts, sampler, digest = prepare_data(arch, pipe, job, device, random.Random(seed), bool(text_encoders))
    denoiser = arch.denoiser(pipe)
    modules = {arch.denoiser_name: denoiser} | text_encoders
    groups = [
        {
            "params": add_lora_to(name, module, arch, process),
            "lr": train_cfg.learning_rate
            if module is denoiser
            else train_cfg.text_encoder_lr or train_cfg.learning_rate,
        }
        for name, module in modules.items()
    ]
    params = [param for group in groups for param in group["params"]]
    if train_cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    optimizer = accelerator.prepare(make_optimizer(train_cfg, groups, device, job.warnings))
    ema = make_ema(train_cfg, params)
    loss_options = LossOptions(
        scheduler=arch.training_scheduler(pipe),
        timestep_type=train_cfg.timestep_type or ("linear" if train_cfg.linear_timesteps else "sigmoid"),
        noise_offset=train_cfg.noise_offset,
        min_snr_gamma=train_cfg.min_snr_gamma,
    )
    return Run(
        job,
        arch,
        pipe,
        denoiser,
        modules,
        params,
        accelerator,
        optimizer,
        make_lr_scheduler(train_cfg, optimizer),
        ema,
        sampler,
        texts,
        loss_options,
        random.Random(seed + 1),
        digest,
        weight_dtype=weight_dtype,
        trains_text_encoder=bool(text_encoders),
    )


def add_lora_to(name: str, module: torch.nn.Module, arch: Arch, process) -> list[torch.nn.Parameter]:
    targets = arch.lora_targets if name == arch.denoiser_name else TEXT_ENCODER_TARGETS
    params = lora_io.add_lora(module, targets, process.network.rank, process.network.alpha, process.network.dropout)
    module.train()
    return params


def choose_device(requested: str, dtype_name: str, warnings: list[str]) -> tuple[torch.device, torch.dtype]:
    """The config's device when it exists here, else the CPU; half precision only on CUDA."""
    if requested.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(requested)
    else:
        if requested != "cpu":
            warnings.append(f"config.process[0].device: {requested!r} is not available here; training on the CPU")
        device = torch.device("cpu")
    dtype = WEIGHT_DTYPES[dtype_name]
    if device.type == "cpu" and dtype != torch.float32:
        warnings.append(f"config.process[0].train.dtype: {dtype_name} needs CUDA; training in fp32 on the CPU")
        dtype = torch.float32
    return device, dtype


def make_accelerator(device: torch.device, weight_dtype: torch.dtype):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one state per process and refuses a second Accelerator with another
    # precision; a worker trains job after job, each with its own settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=MIXED_PRECISION[weight_dtype], cpu=device.type == "cpu")


def load_pipeline(arch: Arch, job: TrainJob, device: torch.device, weight_dtype: torch.dtype):
    model_cfg = job.config.process.model
    quantize = model_cfg.quantize and device.type == "cuda" and _bitsandbytes_available()
    if model_cfg.quantize and not quantize:
        job.warnings.append(
            "config.process[0].model.quantize: 8-bit base weights need CUDA and bitsandbytes; "
            "the base model is kept in full precision"
        )
    log.info("loading %s model %s (%s, %s)", arch.name, model_cfg.name_or_path, device, weight_dtype)
    pipe = arch.load(
        job.model_source,
        weight_dtype,
        str(hf_cache_dir()),
        quantize,
        model_cfg.revision,
        field="config.process[0].model.name_or_path",
        shown=model_cfg.name_or_path,
    )
    for module in [arch.denoiser(pipe), *arch.encoders(pipe)]:
        module.requires_grad_(False)  # only LoRA layers train
    if not quantize:
        pipe.to(device)
    else:
        for module in arch.encoders(pipe):
            module.to(device)
    return pipe


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


class TextCache:
    """Caption -> conditioning tensors, encoded once each; or every step, with gradients when the
    text encoders train (``trainable``) or when ``memoize`` is off."""

    def __init__(self, arch: Arch, pipe, device: torch.device, memoize: bool = True, trainable: bool = False):
        self.arch, self.pipe, self.device = arch, pipe, device
        self.memoize, self.trainable = memoize and not trainable, trainable
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        if not self.memoize:
            with torch.set_grad_enabled(self.trainable):
                return self.arch.encode_prompt(self.pipe, caption)
        if caption not in self.cache:
            with torch.no_grad():
                encoded = self.arch.encode_prompt(self.pipe, caption)
            self.cache[caption] = {key: value.cpu() for key, value in encoded.items()}
        return self.cache[caption]

    def batch(self, captions: list[str]) -> dict[str, torch.Tensor]:
        conds = [self.get(caption) for caption in captions]
        return {key: torch.cat([c[key] for c in conds]).to(self.device) for key in conds[0]}


def encoders_stay(process, trains_text_encoder: bool) -> bool:
    """Whether steps still need the VAE or text encoders (anything not cached up front)."""
    return (
        trains_text_encoder
        or not process.train.cache_text_embeddings
        or any(d.shuffle_tokens or not (d.cache_latents or d.cache_latents_to_disk) for d in process.datasets)
    )


def prepare_data(arch: Arch, pipe, job: TrainJob, device: torch.device, rng: random.Random, trains_text_encoder: bool):
    """Examples with cached latents, a caption cache, the batch sampler and the dataset hash."""
    process = job.config.process
    multiple = arch.pixel_multiple(pipe)
    examples, items, caches = [], [], {}
    for folder, dataset_cfg in zip(job.dataset_folders, process.datasets, strict=True):
        found = data.read_items(folder, dataset_cfg.default_caption)
        items += found
        made = data.make_examples(
            found, dataset_cfg.resolution, multiple, process.trigger_word, dataset_cfg.num_repeats
        )
        if dataset_cfg.cache_latents or dataset_cfg.cache_latents_to_disk:
            cache_folder = (
                folder / data.CACHE_DIR / "latents" / _model_key(job) if dataset_cfg.cache_latents_to_disk else None
            )
            caches[folder] = data.LatentCache(cache_folder)
        examples += made
    started = time.monotonic()
    cached = [e for e in examples if e.item.path.parent in caches]
    encoded = data.cache_latents(cached, lambda pixels: arch.encode_pixels(pipe, pixels), caches)
    texts = TextCache(arch, pipe, device, memoize=process.train.cache_text_embeddings, trainable=trains_text_encoder)
    if texts.memoize:
        for caption in {e.caption for e in examples} | {""}:
            texts.get(caption)
    log.info(
        "cached %d of %d latents (%d encoded, %d from disk) and %d captions in %.1fs",
        len(cached),
        len(examples),
        encoded,
        len(cached) - encoded,
        len(texts.cache),
        time.monotonic() - started,
    )
    if not encoders_stay(process, trains_text_encoder):
        offload_encoders(arch, pipe)
    return texts, data.BucketSampler(examples, process.train.batch_size, rng), data.dataset_hash(items)


def _model_key(job: TrainJob) -> str:
    """Latents depend on the VAE: cache them per base model."""
    return hashlib.sha256(job.model_source.encode()).hexdigest()[:16]


def offload_encoders(arch: Arch, pipe) -> None:
    """Free the device of the text encoders and VAE while the loop runs (sampling brings them back)."""
    for module in arch.encoders(pipe):
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_optimizer(train_cfg, params: list, device: torch.device, warnings: list[str]):
    """The configured optimizer over ``params`` (parameters, or groups with their own lr)."""
    name = train_cfg.optimizer
    options = dict(train_cfg.optimizer_params)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    lr = train_cfg.learning_rate
    if name in ("adamw8bit", "adam8bit"):
        if device.type == "cuda" and _bitsandbytes_available():
            import bitsandbytes as bnb

            return (bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Adam8bit)(params, lr=lr, **options)
        warnings.append(f"config.process[0].train.optimizer: {name} needs CUDA and bitsandbytes; using AdamW")
        name = "adamw"
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, **options)
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    try:
        return optimizer_class(params, lr=lr, **options)
    except TypeError as exc:
        raise FastBackendError(
            f"config.process[0].train.optimizer_params: not valid for {name} ({exc})", code=ErrorCode.INVALID_CONFIG
        ) from None


def make_lr_scheduler(train_cfg, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train_cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=train_cfg.lr_warmup_steps,
        num_training_steps=train_cfg.steps,
        **train_cfg.lr_scheduler_params,
    )


def make_ema(train_cfg, params: list[torch.nn.Parameter]):
    if not train_cfg.ema_config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=train_cfg.ema_config.ema_decay)


def log_run_shape(run: Run) -> None:
    train_cfg = run.job.config.process.train
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
        run.arch.name,
        ", ".join(run.lora_modules),
        run.job.config.process.network.rank,
        layers,
        f"{trainable:,}",
        len(run.sampler.examples),
        len(run.sampler.buckets),
        train_cfg.batch_size,
        train_cfg.gradient_accumulation_steps,
        train_cfg.steps,
        run.step,
        train_cfg.learning_rate,
    )


# ---------------------------------------------------------------- one step


def optimizer_step(run: Run) -> float:
    """One optimizer step over ``gradient_accumulation_steps`` batches; returns the mean loss."""
    train_cfg = run.job.config.process.train
    accumulation = train_cfg.gradient_accumulation_steps
    total = 0.0
    for _ in range(accumulation):
        loss = compute_loss(run, next_batch(run))
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"training stopped: the loss became {loss.item()} at step {run.step + 1}; "
                f"the last good save is kept ({_last_save(run)})"
            )
        run.accelerator.backward(loss / accumulation)
        total += loss.item()
    if train_cfg.max_grad_norm:
        run.accelerator.clip_grad_norm_(run.params, train_cfg.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.params)
    return total / accumulation


def _last_save(run: Run) -> str:
    return run.saves[-1].name if run.saves else "none yet"


def compute_loss(run: Run, batch: Batch) -> torch.Tensor:
    with run.accelerator.autocast():
        return run.arch.loss(run.pipe, run.denoiser, batch, run.loss_options)


def next_batch(run: Run) -> Batch:
    """Draw examples from one bucket, sample their latents, and pick each step's captions."""
    examples = run.sampler.next_batch()
    options = [caption_options(run, e) for e in examples]
    captions = [data.caption_for_step(e.caption, o, run.rng) for e, o in zip(examples, options, strict=True)]
    dtype = run.weight_dtype
    device = run.denoiser.device  # the configured device (accelerate only knows its default one)
    posteriors = [latent_posterior(run, e) for e in examples]
    mean = torch.stack([m for m, _ in posteriors]).to(device)
    std = torch.stack([s for _, s in posteriors]).to(device)
    raw = mean + std * torch.randn_like(mean)  # a fresh draw from the VAE's posterior each step
    latents = run.arch.scale_latents(run.pipe, raw).to(dtype)
    sizes = torch.tensor([e.sizes for e in examples])
    cond = {k: v.to(dtype) for k, v in run.texts.batch(captions).items()}
    return Batch(latents=latents, cond=cond, sizes=sizes)


def latent_posterior(run: Run, example: data.Example) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached latent mean/std, or (``cache_latents: false``) the VAE's output for this step."""
    if example.mean is not None:
        return example.mean, example.std
    return data.encode_example(example, lambda pixels: run.arch.encode_pixels(run.pipe, pixels))


def caption_options(run: Run, example: data.Example) -> data.CaptionOptions:
    process = run.job.config.process
    dataset_cfg = process.datasets[run.job.dataset_folders.index(example.item.path.parent)]
    return data.CaptionOptions(
        process.trigger_word, dataset_cfg.caption_dropout_rate, dataset_cfg.shuffle_tokens, dataset_cfg.keep_tokens
    )


def report_step(run: Run, hooks: Hooks, loss: float, seconds: float, progress) -> None:
    total = run.job.config.process.train.steps
    info = {
        "step": run.step,
        "total_steps": total,
        "loss": round(loss, 6),
        "lr": run.lr_scheduler.get_last_lr()[0],
        "s_per_step": round(seconds, 3),
        "eta_s": round(seconds * (total - run.step), 1),
    }
    hooks.on_step(info)
    if progress is not None:
        progress.set_postfix(loss=f"{loss:.4f}")
        progress.update(1)


def _progress_bar(total: int, start: int):
    """A terminal bar when a person is watching; RunPod's logs get progress updates instead."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="training")


def downsample(history: list[tuple[int, float]], points: int = LOSS_HISTORY_POINTS) -> list[list[float]]:
    """At most ``points`` [step, mean loss] pairs, each the mean over its slice of steps."""
    if not history:
        return []
    size = math.ceil(len(history) / points)
    chunks = [history[i : i + size] for i in range(0, len(history), size)]
    return [[chunk[-1][0], round(sum(loss for _, loss in chunk) / len(chunk), 6)] for chunk in chunks]


# ---------------------------------------------------------------- saving, resuming, sampling


def save_checkpoint(run: Run, hooks: Hooks, final: bool) -> Path:
    """Save the LoRA (EMA weights when EMA is on) and the state to resume from; prune old step saves."""
    process = run.job.config.process
    name = run.job.config.name
    path = run.job.output / (f"{name}.safetensors" if final else f"{name}_{run.step:09d}.safetensors")
    metadata = lora_io.lora_metadata(
        run.arch.name,
        process.model.name_or_path,
        process.network.rank,
        process.network.alpha,
        run.step,
        process.datasets[0].resolution,
        process.trigger_word,
        run.dataset_hash,
        name,
        run.job.config.model_dump_json(exclude_defaults=True),
    )
    with ema_weights(run):
        states = lora_io.lora_state(run.lora_modules)
    run.sha256[path.name] = lora_io.save_lora(
        path, run.arch.name, states, process.network.rank, process.network.alpha, process.save.dtype, metadata
    )
    if not final:
        run.saves.append(path)
        prune_step_saves(run)
    save_state(run)
    write_model_record(run)
    hooks.on_save(path)
    log.info("saved %s", path)
    return path


class ema_weights:
    """Within the block the LoRA holds its EMA weights (a no-op without EMA)."""

    def __init__(self, run: Run):
        self.run = run

    def __enter__(self):
        if self.run.ema is not None:
            self.run.ema.store(self.run.params)
            self.run.ema.copy_to(self.run.params)

    def __exit__(self, *exc):
        if self.run.ema is not None:
            self.run.ema.restore(self.run.params)


def prune_step_saves(run: Run) -> None:
    keep = run.job.config.process.save.max_step_saves_to_keep
    while len(run.saves) > keep:
        old = run.saves.pop(0)
        old.unlink(missing_ok=True)
        run.sha256.pop(old.name, None)


def save_state(run: Run) -> None:
    """Everything needed to continue this run after a crash, written atomically."""
    state = {
        "step": run.step,
        "fingerprint": fingerprint(run),
        "lora": lora_io.lora_state(run.lora_modules),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "history": run.history,
        "saves": [p.name for p in run.saves],
        "sha256": run.sha256,
        "rng": {"python": run.rng.getstate(), "torch": torch.get_rng_state()},
    }
    with temporary_path(run.job.output / STATE_FILE) as tmp:
        torch.save(state, tmp)


def fingerprint(run: Run) -> dict:
    """What must match for a saved state to be continued: same model, network and data."""
    process = run.job.config.process
    return {
        "arch": run.arch.name,
        "model": process.model.name_or_path,
        "rank": process.network.rank,
        "alpha": process.network.alpha,
        "dataset": run.dataset_hash,
        "lora_modules": sorted(run.lora_modules),
    }


def restore_state(run: Run) -> int:
    """Continue from ``training_state.pt`` when it belongs to this config; returns the step resumed at."""
    path = run.job.output / STATE_FILE
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, in our own folder
    if state["fingerprint"] != fingerprint(run):
        run.job.warnings.append(
            f"saved state at step {state['step']} was made with another model, network or "
            "dataset; training started from step 0"
        )
        return 0
    lora_io.load_lora_state(run.lora_modules, state["lora"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    run.step, run.history, run.sha256 = state["step"], state["history"], state["sha256"]
    run.saves = [run.job.output / name for name in state["saves"] if (run.job.output / name).exists()]
    run.rng.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    run.job.warnings.append(f"resumed from the saved state at step {run.step}")
    log.info("resumed from step %d", run.step)
    return run.step


def write_model_record(run: Run) -> None:
    """``metadata.json``: what list_models and download_model read instead of re-hashing files."""
    process = run.job.config.process
    record = {
        "name": run.job.config.name,
        "arch": run.arch.name,
        "base_model": process.model.name_or_path,
        "rank": process.network.rank,
        "alpha": process.network.alpha,
        "steps": run.step,
        "dataset_hash": run.dataset_hash,
        "sha256": run.sha256,
        "loss_history": downsample(run.history),
    }
    atomic_write_bytes(run.job.output / "metadata.json", json.dumps(record, indent=1).encode())


def should_sample(run: Run, total: int, final: bool = False) -> bool:
    sample_cfg = run.job.config.process.sample
    if sample_cfg is None or not sample_cfg.prompts or run.job.config.process.train.disable_sampling:
        return False
    if final:
        return True
    return run.step % sample_cfg.sample_every == 0 and run.step < total


@torch.no_grad()
def sample(run: Run) -> list[Path]:
    """The config's prompts through the pipeline with the LoRA (EMA weights when on), saved under samples/."""
    sample_cfg = run.job.config.process.sample
    width, height = run.arch.snap_size(run.pipe, sample_cfg.width, sample_cfg.height)
    device = run.denoiser.device
    for module in run.arch.encoders(run.pipe):
        module.to(device)
    for module in run.lora_modules.values():
        module.eval()
    paths = []
    try:
        with ema_weights(run):
            for index, prompt in enumerate(sample_cfg.prompts):
                prompt = data.apply_trigger(prompt, run.job.config.process.trigger_word)
                seed = sample_cfg.seed + index if sample_cfg.walk_seed else sample_cfg.seed
                image = run.pipe(
                    prompt,
                    num_inference_steps=sample_cfg.sample_steps,
                    guidance_scale=sample_cfg.guidance_scale,
                    width=width,
                    height=height,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    **run.arch.sample_kwargs(run.pipe, sample_cfg.negative_prompt),
                ).images[0]
                paths.append(
                    save_image(image, run.job.output / "samples" / f"{run.step:09d}_{index}.{sample_cfg.format}")
                )
    finally:
        for module in run.lora_modules.values():
            module.train()
        if not encoders_stay(run.job.config.process, run.trains_text_encoder):
            offload_encoders(run.arch, run.pipe)
    run.samples += paths
    return paths


def save_image(image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:]])
    atomic_write_bytes(path, buffer.getvalue())
    return path
