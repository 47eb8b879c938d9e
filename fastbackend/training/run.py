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
from fastbackend.training import data, lora_io
from fastbackend.training.caching import TextCache
from fastbackend.training.families import Family, LossOptions

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


class NonFiniteLoss(FastBackendError):
    code = ErrorCode.NON_FINITE_LOSS


class TrainingStopped(FastBackendError):
    code = ErrorCode.STOPPED


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
