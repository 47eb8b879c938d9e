"""The state of one training run, shared by the loop, its set-up, checkpoints and samples.

``TrainJob`` is what the caller resolved and checked; ``Run`` is built from it by
``setup.set_up`` and carries everything live (model, optimizer, data) through the loop.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastbackend.config import ProcessConfig, TrainingConfig
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.layout import LoraFolder
from fastbackend.stopping import JobStopped
from fastbackend.training import data, lora_io
from fastbackend.training.caching import TextCache
from fastbackend.training.families import Family, LossOptions
from fastbackend.training.likeness import Likeness

LOSS_HISTORY_POINTS = 100


@dataclass
class TrainJob:
    """Everything the loop needs, resolved and checked by the caller."""

    config: TrainingConfig
    base_model: str  # a local folder or a hub id, as storage.resolve_base_model resolved it
    dataset_folders: list[Path]
    output: LoraFolder
    resume: bool = True
    warnings: list[str] = field(default_factory=list)
    assistant_lora: str | None = None  # a training adapter: a file, or a hub file as storage.hub_file reads it


@dataclass
class Hooks:
    """How the loop reports to the platform; the core never imports runpod."""

    on_step: Callable[[dict], None] = lambda info: None  # {"stage": "training", "step", "loss", "eta_s", ...}
    # {"stage": "loading_model" | "caching" | "sampling" | "saving", ...}: what the run is doing between steps
    on_stage: Callable[[dict], None] = lambda info: None
    should_stop: Callable[[], bool] = lambda: False  # a cancel or timeout: stop after this step, resumable


@dataclass
class TrainResult:
    lora_path: Path
    sha256: str
    steps: int
    final_loss: float | None
    loss_history: list[list[float]]  # [[step, loss], ...], downsampled
    duration_s: float
    samples: list[Path]
    saves: list[Path]
    resumed_from: int
    warnings: list[str]
    likeness: list[dict] = field(default_factory=list)  # [{step, score, faces_found, matches, images}]
    best_checkpoint: dict | None = None  # {filename, step, score}: the saved file that looks most like the dataset
    stopped_early: bool = False  # train.early_stop_on_likeness ended the run


def out_of_memory() -> FastBackendError:
    return FastBackendError(
        "training ran out of GPU memory; try model.quantize: true, train.gradient_checkpointing: true, "
        "a smaller train.batch_size or smaller datasets[].resolution (a resumable state, if any, is kept)",
        code=ErrorCode.OUT_OF_MEMORY,
    )


class NonFiniteLoss(FastBackendError):
    code = ErrorCode.NON_FINITE_LOSS


class TrainingStopped(JobStopped):
    """A stopped run, saved: sent again, it resumes."""


@dataclass(kw_only=True)
class Run:
    """The live state of one training run."""

    job: TrainJob
    family: Family
    pipe: Any  # the diffusers pipeline
    denoiser: torch.nn.Module
    lora_modules: lora_io.Components  # the denoiser, and the text encoders when they train too
    params: list[torch.nn.Parameter]
    accelerator: Any  # accelerate.Accelerator
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # a torch LR scheduler from diffusers.optimization
    ema: Any | None  # diffusers.training_utils.EMAModel
    sampler: data.BucketSampler
    texts: TextCache
    loss_options: LossOptions
    rng: random.Random  # captions: dropout and shuffling
    dataset_hash: str
    weight_dtype: torch.dtype = torch.float32  # of the base weights; inputs are cast to it
    trains_text_encoder: bool = False
    step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    saves: list[Path] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    likeness_reference: tuple[float, ...] | None = None  # the dataset's median face; None: not scored
    likeness: list[Likeness] = field(default_factory=list)
    stopped_early: bool = False
    sampled_at: int | None = None  # the step of the last sample round

    @property
    def process(self) -> ProcessConfig:
        return self.job.config.process

    @property
    def folder(self) -> LoraFolder:
        return self.job.output

    def loss_history(self, points: int = LOSS_HISTORY_POINTS) -> list[list[float]]:
        """At most ``points`` [step, mean loss] pairs, each the mean over its slice of steps."""
        if not self.history:
            return []
        size = math.ceil(len(self.history) / points)
        chunks = [self.history[i : i + size] for i in range(0, len(self.history), size)]
        return [[chunk[-1][0], round(sum(loss for _, loss in chunk) / len(chunk), 6)] for chunk in chunks]

    # ---------------------------------------------------------------- several processes (distributed.py)

    @property
    def is_main(self) -> bool:
        """The process that saves, samples and reports (the only one, unless several GPUs train)."""
        return self.accelerator.is_main_process

    def agreed_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The batch loss averaged over the processes: every one sees the same value, so all stop
        together on a non-finite one."""
        if self.accelerator.num_processes == 1:
            return loss.detach()
        return self.accelerator.reduce(loss.detach().clone(), reduction="mean")

    def agreed_flags(self, *flags: bool) -> list[bool]:
        """Each flag, true when any process raised it (a stop request, an early stop): all stop at
        the same step."""
        if self.accelerator.num_processes == 1:
            return list(flags)
        raised = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=self.denoiser.device)
        return [bool(value > 0) for value in self.accelerator.reduce(raised, reduction="sum").tolist()]

    def average_gradients(self) -> None:
        """The LoRA's gradients averaged over the processes, in one flat exchange, so every process
        takes the same update and keeps the same LoRA."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def check_same_lora(self) -> None:
        """With several processes, that they all hold the same LoRA (what the main one saves)."""
        if self.accelerator.num_processes == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        sums = self.accelerator.gather(total)
        if not torch.allclose(sums, sums[0], rtol=1e-6, atol=1e-9):
            raise FastBackendError(
                f"the training processes' LoRAs diverged by step {self.step} (sums {sums.tolist()})",
                code=ErrorCode.INTERNAL_ERROR,
            )

    def separate_random_streams(self, resumed_from: int) -> None:
        """Give each process but the main one its own noise, batches and caption draws (after a
        common start: the LoRA's initial weights, or a resumed state, are the same everywhere),
        from the run's seed and the step it starts at."""
        index = self.accelerator.process_index
        if index == 0:
            return
        seed = ((self.process.train.seed or 0) * 1_000_003 + resumed_from * 7_919 + index) % 2**31
        torch.manual_seed(seed)
        self.sampler.rng.seed(seed + 1)
        self.rng.seed(seed + 2)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the LoRA holds its EMA weights (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)
