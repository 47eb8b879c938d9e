"""Saving and resuming: LoRA files on schedule, the state to continue from, the model's record.

Every ``save_every`` steps the LoRA is saved as ``<name>_<step>.safetensors`` (older step saves
pruned to ``max_step_saves_to_keep``) together with ``training_state.pt``: LoRA, optimizer,
scheduler, EMA and RNG state. A job sent again after a crash resumes from it when the model,
network and data are the same. File names come from ``layout.LoraFolder``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fastbackend.layout import LoraRecord
from fastbackend.storage import temporary_path
from fastbackend.training import likeness, lora_io
from fastbackend.training.run import NonFiniteLoss, Run

log = logging.getLogger("fastbackend.trainer")


def save_checkpoint(run: Run, final: bool) -> Path:
    """Save the LoRA (EMA weights when EMA is on) and the state to resume from; prune old step saves."""
    process, name = run.process, run.job.config.name
    path = run.folder.final_lora if final else run.folder.step_save(run.step)
    metadata = lora_io.lora_metadata(
        run.family,
        process.model.name_or_path,
        process.network.rank,
        process.lora_alpha,
        run.step,
        process.datasets[0].resolution,
        process.trigger_word or process.datasets[0].trigger_word,
        run.dataset_hash,
        name,
        run.job.config.model_dump_json(exclude_defaults=True),
    )
    with run.ema_weights():
        states = lora_io.lora_state(run.lora_modules)
    check_finite(run, states)
    run.sha256[path.name] = lora_io.save_lora(
        path, run.family, states, process.network.rank, process.lora_alpha, process.save.dtype, metadata
    )
    if not final:
        run.saves.append(path)
        prune_step_saves(run)
    save_state(run)
    write_model_record(run)
    log.info("saved %s", path)
    return path


def check_finite(run: Run, states: lora_io.States) -> None:
    """A LoRA with a NaN or infinite weight is never saved (nor called a success)."""
    for module, state in states.items():
        for key, value in state.items():
            if not torch.isfinite(value).all():
                last_save = run.saves[-1].name if run.saves else "none yet"
                raise NonFiniteLoss(
                    f"training stopped: the LoRA weight {module}.{key} became non-finite at step {run.step}; "
                    f"the last good save is kept ({last_save})"
                )


def prune_step_saves(run: Run) -> None:
    """The newest ``max_step_saves_to_keep`` step saves stay, and the one with the best likeness too."""
    keep = run.process.save.max_step_saves_to_keep
    best = likeness.best(run.likeness)
    kept = run.folder.step_save(best.step) if best is not None else None
    others = [p for p in run.saves if p != kept]
    for old in others[: max(0, len(others) - keep)]:
        run.saves.remove(old)
        old.unlink(missing_ok=True)
        run.sha256.pop(old.name, None)


def save_state(run: Run) -> None:
    """Everything needed to continue this run after a crash, written atomically."""
    state = {
        "step": run.step,
        "fingerprint": fingerprint(run),
        "lora": lora_io.lora_state(run.lora_modules),
        "optimizer": run.optimizer.state_dict(),
        "optimizer_class": optimizer_class(run),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        # Gradients of an accumulation window the save fell inside (gradient_accumulation_steps).
        "grads": [None if p.grad is None else p.grad.detach().cpu() for p in run.params],
        "history": run.history,
        "likeness": [s.as_dict() for s in run.likeness],
        "saves": [p.name for p in run.saves],
        "sha256": run.sha256,
        # Every random source the steps draw from, so a resumed run continues exactly as it would have.
        "rng": {
            "captions": run.rng.getstate(),
            "batches": run.sampler.rng.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "processes": run.accelerator.num_processes,  # a resume on another number of GPUs says so
        # fp16's loss scale: the saved gradients are scaled by it
        "scaler": run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None,
    }
    with temporary_path(run.folder.state) as tmp:
        torch.save(state, tmp)


def fingerprint(run: Run) -> dict:
    """What must match for a saved state to be continued: same model, training adapter, network
    (its trained tensors, counted: layers that share one, as FLUX.2's q, k and v, count once) and data."""
    process = run.process
    return {
        "arch": run.family.name,
        "model": process.model.name_or_path,
        "assistant": adapter_identity(run.job.assistant_lora),
        "rank": process.network.rank,
        "alpha": process.lora_alpha,
        "parameters": [len(run.params), sum(p.numel() for p in run.params)],
        "dataset": run.dataset_hash,
        "lora_modules": sorted(run.lora_modules),
    }


def adapter_identity(reference: str | None) -> str | None:
    """A training adapter as the fingerprint knows it: a hub file by name, a local file by name and size."""
    if reference is None or not Path(reference).is_absolute():
        return reference
    return f"{reference} ({Path(reference).stat().st_size} bytes)"


def optimizer_class(run: Run) -> str:
    return type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__  # inside accelerate's wrapper


def restore_optimizer(run: Run, state: dict) -> None:
    """The optimizer's moments, when the saved ones are this optimizer's: a retry may run with
    another (a preset choosing for a larger GPU, an edited YAML), whose state cannot take them."""
    saved = state.get("optimizer_class")
    now = optimizer_class(run)
    if saved is None or saved == now:
        try:
            run.optimizer.load_state_dict(state["optimizer"])
            return
        except (KeyError, ValueError, RuntimeError):  # an older state of another optimizer
            pass
    run.job.warnings.append(
        f"the saved state's optimizer is {saved or 'another one'}, this run's is {now}: the LoRA weights, "
        "schedule and step continue, the optimizer starts with fresh moments"
    )


def restore_state(run: Run) -> int:
    """Continue from the saved state when it belongs to this config; returns the step resumed at."""
    path = run.folder.state
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
    restore_optimizer(run, state)
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    for param, grad in zip(run.params, state.get("grads") or [None] * len(run.params), strict=True):
        param.grad = None if grad is None else grad.to(param.device)
    run.step, run.history, run.sha256 = state["step"], state["history"], state["sha256"]
    run.likeness = [likeness.Likeness(**s) for s in state.get("likeness", [])]
    run.saves = [run.folder.path / name for name in state["saves"] if (run.folder.path / name).exists()]
    rng = state["rng"]
    run.rng.setstate(rng["captions"] if "captions" in rng else rng["python"])  # "python": older states
    if "batches" in rng:
        run.sampler.rng.setstate(rng["batches"])
    torch.set_rng_state(rng["torch"])
    restore_gpu_streams(state, run.accelerator.num_processes, run.job.warnings)
    if state.get("scaler") is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    run.job.warnings.append(f"resumed from the saved state at step {run.step}")
    if run.step >= run.process.train.steps:
        run.job.warnings.append(
            f"the saved state is at step {run.step}, not before train.steps {run.process.train.steps}: nothing more "
            "was trained (send resume: false to start over)"
        )
    log.info("resumed from step %d", run.step)
    return run.step


def restore_gpu_streams(state: dict, processes: int, warnings: list[str]) -> None:
    """The GPUs' random streams, when this host has as many GPUs as the one that saved them; a run
    saved by N training processes resumes in any other number (a worker with fewer or more GPUs):
    the LoRA, optimizer and schedule continue, the per-GPU random streams start afresh."""
    saved = state.get("processes", 1)  # states from before this was recorded: one process
    streams = state["rng"].get("cuda") or []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved != processes or (gpus and len(streams) != gpus):
        warnings.append(
            f"the saved state was trained in {saved} process(es) on {len(streams)} GPU(s), this run in {processes} on "
            f"{gpus}: the LoRA, optimizer, schedule and the main process's batch order continue; the GPUs' random "
            "streams the saved state has no match for start afresh"
        )
    for index, stream in enumerate(streams[:gpus]):  # torch cannot index a GPU this host lacks
        torch.cuda.set_rng_state(stream, index)


def write_model_record(run: Run) -> None:
    """The folder's metadata record: what list_models and download_model read instead of re-hashing files."""
    process = run.process
    run.folder.write_metadata(
        LoraRecord(
            name=run.job.config.name,
            arch=run.family.name,
            base_model=process.model.name_or_path,
            rank=process.network.rank,
            alpha=process.lora_alpha,
            steps=run.step,
            dataset_hash=run.dataset_hash,
            sha256=run.sha256,
            loss_history=run.loss_history(),
            likeness=[s.as_dict() for s in run.likeness],
        )
    )
