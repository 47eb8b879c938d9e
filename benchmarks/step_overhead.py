"""The trainer's own cost per step, outside the model: what a fast GPU cannot hide.

The tiny FLUX pipeline is set up through the trainer (the user's YAML: cached latents and
caption embeddings, rank-16 LoRA, adamw8bit), then the denoiser's loss is replaced by one that
does almost no work (a tiny sum over one LoRA tensor), so a step's time is the trainer's: the
batch (latent draw, captions, embeddings), backward bookkeeping, the optimizer over every LoRA
tensor, the schedule and the progress report. Beside it, in the same run, the floor: the same
trivial loss and optimizer step alone. Aim: the trainer's extra cost under 5 ms per step, under
1% of a FLUX.1 step on a fast GPU.

    .venv/bin/python -m benchmarks.step_overhead [--steps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def set_up_run(root: Path):
    """A live run of the user's YAML on the tiny FLUX pipeline, as the trainer starts it."""
    from devtools import tiny
    from devtools.photos import synthetic_photo
    from fastbackend.api.train import resolve_datasets
    from fastbackend.config import parse_training_config
    from fastbackend.layout import LoraFolder
    from fastbackend.storage import resolve_base_model
    from fastbackend.training.run import TrainJob
    from fastbackend.training.setup import set_up
    from handler_fast import handler

    os.environ["FASTBACKEND_DATA_DIR"] = str(root)
    tiny.build("flux", root / "models" / "flux")
    files = [
        {"filename": f"IMG_{i}.jpg", "content": base64.b64encode(synthetic_photo(320, 320, i)).decode()}
        for i in range(4)
    ]
    upload = {"type": "upload_training_data", "training_name": "matt_training_test", "files": files}
    assert handler({"id": "u", "input": upload})["status"] == "success"
    text = (Path(__file__).resolve().parent.parent / "examples" / "training.yaml").read_text()
    text = text.replace("black-forest-labs/FLUX.1-dev", "models/flux").replace("      - 768\n", "")
    text = text.replace("      - 512\n", "      - 64\n").replace("      - 1024\n", "").replace("      - 1280\n", "")
    config, warnings = parse_training_config(text)
    base = resolve_base_model(config.process.model.name_or_path, "name_or_path")
    output = LoraFolder(root / "output" / config.name)
    return set_up(TrainJob(config, base, resolve_datasets(config), output, warnings=warnings))


def trivial_loss(run):
    """Almost no work, but a real graph through one LoRA tensor (so backward and the optimizer run)."""
    return (run.params[0] * 1e-6).sum()


def time_trainer(run, steps: int) -> float:
    from fastbackend.training import trainer
    from fastbackend.training.run import Hooks

    trainer.compute_loss = lambda run, batch: trivial_loss(run)
    hooks = Hooks()
    started = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step(run)
        run.step += 1
        trainer.report_step(run, hooks, loss, 0.0, None)
    return (time.perf_counter() - started) / steps


def time_floor(run, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trivial_loss(run).backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("fastbackend").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        run = set_up_run(Path(tmp))
        run.process.train.steps = 10**9  # the schedule never ends inside the benchmark
        run.process.train.gradient_accumulation_steps = 1  # an optimizer update every step, as the floor's
        times: dict[str, list[float]] = {"floor: trivial loss + optimizer": [], "trainer step": []}
        for _ in range(args.rounds):
            times["floor: trivial loss + optimizer"].append(time_floor(run, args.steps))
            times["trainer step"].append(time_trainer(run, args.steps))
    floor = statistics.median(times["floor: trivial loss + optimizer"])
    tensors = len(run.params)
    print(f"tiny FLUX, {tensors} LoRA tensors, {run.optimizer.optimizer.__class__.__name__}, 1 thread")
    print(f"{'path':<34}{'ms/step':>9}{'over floor':>12}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<34}{median * 1000:>9.2f}{(median - floor) * 1000:>10.2f} ms")


if __name__ == "__main__":
    main()
