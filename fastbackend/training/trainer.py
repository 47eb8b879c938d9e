"""The LoRA training loop: typed config in, LoRA files out, progress through hooks.

``train(job, hooks)`` reads top to bottom: set up (device, model, cached latents and caption
embeddings, LoRA layers, optimizer: ``setup``), resume from the newest saved state if there is
one (``checkpoint``), then run ``steps`` steps, saving (``checkpoint``) and sampling
(``sampling``) on schedule. A non-finite loss stops the run with its step number; the last good
save stays.

A step counts as ai-toolkit counts it. Each step trains ``gradient_accumulation`` batches of
``batch_size`` and adds their gradients (summed, as ai-toolkit's); the optimizer updates every
``gradient_accumulation_steps`` steps (ai-toolkit's older key, with which ``steps`` counts
micro-batches) with the mean over those steps, and the learning-rate schedule advances every step.
ai-toolkit with ``gradient_accumulation_steps`` keeps only the last micro-batch's gradient and
drops a last, partial window; this worker averages every window, the last one included.

The core never imports runpod: the handler turns ``hooks.on_step`` into progress updates.
"""

from __future__ import annotations

import sys
import time

import torch

from fastbackend import stopping
from fastbackend.training import data, likeness
from fastbackend.training.checkpoint import restore_state, save_checkpoint, write_model_record
from fastbackend.training.families import TrainingBatch
from fastbackend.training.run import Hooks, NonFiniteLoss, Run, TrainingStopped, TrainJob, TrainResult
from fastbackend.training.sampling import sample, should_sample
from fastbackend.training.setup import log_run_shape, set_up


def train(job: TrainJob, hooks: Hooks | None = None) -> TrainResult:
    """Train ``job``; the process's global RNG state is the same afterwards (the run seeds its own)."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        return _train(job, hooks or Hooks())


def _train(job: TrainJob, hooks: Hooks) -> TrainResult:
    started = time.monotonic()
    run = set_up(job, hooks)
    resumed_from = restore_state(run) if job.resume else 0
    run.check_same_lora()  # with several processes: the same start everywhere, or stop now, not at the end
    run.separate_random_streams(resumed_from)
    if run.is_main and scores_likeness(run):
        run.likeness_reference = likeness.reference_face(job.dataset_folders, job.warnings)
    log_run_shape(run)
    total = run.process.train.steps
    bar = terminal_bar(total, resumed_from)
    while run.step < total and not stops(run, hooks, resumed_from):
        step_started = time.monotonic()
        loss = train_step(run)
        run.step += 1
        run.history.append((run.step, loss))
        report_step(run, hooks, loss, time.monotonic() - step_started, bar)
        saving = run.step % run.process.save.save_every == 0 and run.step < total
        if run.is_main:  # the other processes wait at the next step's exchange
            # Samples first: the save's state and pruning then know its likeness.
            sample_and_score(run, hooks, should_sample(run), saving and run.likeness_reference is not None)
            if saving:
                hooks.on_stage({"stage": "saving", "step": run.step})
                save_checkpoint(run, final=False)
    if bar is not None:
        bar.close()
    run.check_same_lora()
    final = run.folder.final_lora
    if run.is_main:
        if run.sampled_at != run.step:  # an early stop sampled and scored this step already
            sample_and_score(run, hooks, should_sample(run, final=True), run.likeness_reference is not None)
        hooks.on_stage({"stage": "saving", "step": run.step})
        save_checkpoint(run, final=True)
    return TrainResult(
        lora_path=final,
        sha256=run.sha256.get(final.name, ""),  # only the main process saves
        steps=run.step,
        final_loss=run.history[-1][1] if run.history else None,
        loss_history=run.loss_history(),
        duration_s=round(time.monotonic() - started, 2),
        samples=run.samples,
        saves=run.saves,
        resumed_from=resumed_from,
        warnings=job.warnings,
        likeness=[s.as_dict() for s in run.likeness],
        best_checkpoint=best_checkpoint(run),
        stopped_early=run.stopped_early,
    )


def scores_likeness(run: Run) -> bool:
    """Whether saves are scored for likeness: there are sample prompts to render."""
    return bool(run.process.sample_prompts)


def sample_and_score(run: Run, hooks: Hooks, sampling: bool, scoring: bool) -> None:
    """Render the sample prompts when on schedule or when this save is scored for likeness."""
    if not (sampling or scoring):
        return
    hooks.on_stage({"stage": "sampling", "step": run.step})
    images = sample(run, hooks.should_stop)
    run.sampled_at = run.step
    if scoring and len(images) == len(run.process.sample_prompts):  # a round a stop cut short is not scored
        score_likeness(run, hooks, images)


def score_likeness(run: Run, hooks: Hooks, images: list) -> None:
    """Score this save's samples, report it, and note a stalled likeness (early_stop_on_likeness)."""
    assert run.likeness_reference is not None
    result = likeness.score(run.step, images, run.likeness_reference)
    run.likeness = [s for s in run.likeness if s.step != run.step] + [result]
    hooks.on_stage({"stage": "likeness", **result.as_dict()})
    patience = run.process.train.early_stop_on_likeness
    if patience and run.step < run.process.train.steps and likeness.stalled(run.likeness, patience):
        run.stopped_early = True
        run.job.warnings.append(
            f"config.process[0].train.early_stop_on_likeness: no better likeness in the last {patience} saves; "
            f"training ended at step {run.step}"
        )
    write_model_record(run)  # metadata.json carries the scores (list_models shows them)


def best_checkpoint(run: Run) -> dict | None:
    """The saved file whose samples looked most like the dataset's face."""
    saved = [s for s in run.likeness if run.folder.step_save(s.step) in run.saves or s.step == run.step]
    chosen = likeness.best(saved)
    if chosen is None:
        return None
    path = run.folder.final_lora if chosen.step == run.step else run.folder.step_save(chosen.step)
    return {"filename": path.name, "step": chosen.step, "score": chosen.score}


def stops(run: Run, hooks: Hooks, resumed_from: int) -> bool:
    """True when likeness stalled (``early_stop_on_likeness``): the run ends here, saved as final.
    On a stop request, save what this run trained (a step save and its state) and stop: the same
    request sent again resumes from there."""
    asked, early = run.agreed_flags(hooks.should_stop(), run.stopped_early)
    if not asked:
        return early
    saved_now = run.saves and run.saves[-1] == run.folder.step_save(run.step)
    if run.step > resumed_from and not saved_now and run.is_main:
        save_checkpoint(run, final=False)
    kept = f"step {run.step} is saved; send the same request again to resume from it" if run.step else "nothing saved"
    resend = f"send the same train_with_yaml again: it resumes from step {run.step}" if run.step else "send it again"
    raise TrainingStopped(f"training stopped by {stopping.cause_in_words()} at step {run.step}: {kept}", resend=resend)


# ---------------------------------------------------------------- one step


def train_step(run: Run) -> float:
    """One step: its batches forward and backward, the optimizer when its window is full; the mean loss."""
    train_cfg = run.process.train
    window = train_cfg.gradient_accumulation_steps
    window_start = run.step - run.step % window
    steps_in_window = min(window, train_cfg.steps - window_start)  # the last window may be short
    losses = [backward_batch(run, steps_in_window) for _ in range(train_cfg.gradient_accumulation)]
    if (run.step + 1) % window == 0 or run.step + 1 == train_cfg.steps:
        optimizer_update(run)
    run.lr_scheduler.step()
    return sum(losses) / len(losses)


def backward_batch(run: Run, steps_in_window: int) -> float:
    """The loss of one batch, its gradient added (scaled so an update averages its window's steps)."""
    loss = compute_loss(run, next_batch(run))
    agreed = run.agreed_loss(loss)
    if not torch.isfinite(agreed):
        last_save = run.saves[-1].name if run.saves else "none yet"
        raise NonFiniteLoss(
            f"training stopped: the loss became {agreed.item()} at step {run.step + 1}; "
            f"the last good save is kept ({last_save})"
        )
    run.accelerator.backward(loss / steps_in_window)
    return agreed.item()


def optimizer_update(run: Run) -> None:
    run.average_gradients()  # over the processes, when several GPUs train
    max_grad_norm = run.process.train.max_grad_norm
    if max_grad_norm:
        run.accelerator.unscale_gradients()  # fp16's loss scale out first, once
        for group in run.optimizer.param_groups:  # per group, as ai-toolkit clips (SDTrainer)
            torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.params)


def compute_loss(run: Run, batch: TrainingBatch) -> torch.Tensor:
    with run.accelerator.autocast():
        return run.family.loss(run.pipe, run.denoiser, batch, run.loss_options)


def next_batch(run: Run) -> TrainingBatch:
    """Draw examples from one bucket, sample their latents, and pick each step's captions."""
    examples = run.sampler.next_batch()
    captions = [data.caption_for_step(e, caption_options(run, e), run.rng) for e in examples]
    dtype = run.weight_dtype
    device = run.denoiser.device  # the configured device (accelerate only knows its default one)
    posteriors = [latent_posterior(run, e) for e in examples]
    mean = data.staged(torch.stack([m for m, _ in posteriors]), device)
    std = data.staged(torch.stack([s for _, s in posteriors]), device)
    raw = mean + std * torch.randn_like(mean)  # a fresh draw from the VAE's posterior each step
    latents = run.family.scale_latents(run.pipe, raw).to(dtype)
    sizes = data.staged(torch.tensor([e.sizes for e in examples]), device)
    cond = {k: v.to(dtype) for k, v in run.texts.batch(captions).items()}
    weights = face_weights(run, examples, latents.shape[-2:])
    loss_weights = None if weights is None else data.staged(weights, device)
    return TrainingBatch(latents=latents, cond=cond, sizes=sizes, loss_weights=loss_weights)


def face_weights(run: Run, examples: list[data.Example], shape) -> torch.Tensor | None:
    """``train.face_loss_weight`` inside each example's face box (in latent cells), 1 elsewhere."""
    weight = run.process.train.face_loss_weight
    if weight is None:
        return None
    factor = run.family.latent_cell_pixels(run.pipe)
    weights = torch.ones(len(examples), 1, *shape)
    for index, example in enumerate(examples):
        box = data.face_in_latents(example, factor)
        if box is not None:
            x0, y0, x1, y1 = box
            weights[index, :, y0:y1, x0:x1] = weight
    return weights


def latent_posterior(run: Run, example: data.Example) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached latent mean/std, or (``cache_latents: false``) the VAE's output for this step."""
    if example.mean is not None and example.std is not None:
        return example.mean, example.std
    return data.encode_example(example, lambda pixels: run.family.encode_pixels(run.pipe, pixels))


def caption_options(run: Run, example: data.Example) -> data.CaptionOptions:
    dataset_cfg = run.process.datasets[run.job.dataset_folders.index(example.item.path.parent)]
    return data.CaptionOptions(
        trigger_word=dataset_cfg.trigger_word or run.process.trigger_word,
        dropout_trigger=run.process.trigger_word,
        dropout_rate=dataset_cfg.caption_dropout_rate,
        shuffle=dataset_cfg.shuffle_tokens,
    )


def report_step(run: Run, hooks: Hooks, loss: float, seconds: float, bar) -> None:
    total = run.process.train.steps
    info = {
        "stage": "training",
        "step": run.step,
        "total_steps": total,
        "loss": round(loss, 6),
        "lr": run.lr_scheduler.get_last_lr()[0],
        "s_per_step": round(seconds, 3),
        "eta_s": round(seconds * (total - run.step), 1),
    }
    hooks.on_step(info)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)


def terminal_bar(total: int, start: int):
    """A tqdm bar when a person is watching a terminal; RunPod's logs get progress updates instead."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="training")
