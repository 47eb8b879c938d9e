"""Seconds per training step: the trainer against a minimal hand-written diffusers + peft loop.

Same model, batch, resolution, LoRA rank and target layers, in one run. The model is an
SD-1.5-shaped pipeline with random weights, larger than the tests' (UNet (64, 128, 256),
8x VAE, 4-layer CLIP), at 256 px, so that model compute dominates. Rows:

* minimal loop: VAE and text encoder run every step, as diffusers' example scripts do;
* trainer, caching off: ``cache_latents: false``, ``cache_text_embeddings: false``;
* trainer, caching on: the defaults (latents and embeddings computed once, before the steps).

Each is run ``--rounds`` times, alternating, and the median step time is reported (the first
``WARMUP`` steps of each run are dropped). Aim: caching off no slower than the minimal loop,
caching on faster.

    .venv/bin/python -m benchmarks.train_step [--steps 8] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESOLUTION = 256
BATCH = 2
RANK = 16
WARMUP = 2
IMAGES = 8


def build_model(folder: Path) -> None:
    """An SD-1.5-shaped pipeline, random weights, about 12M UNet parameters."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from devtools.tiny import save_sd15

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        sample_size=32,
        cross_attention_dim=128,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=4,
            num_hidden_layers=4,
            vocab_size=600,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    save_sd15(folder, unet, vae, text_encoder, scheduler)


def upload_dataset(handler) -> None:
    from devtools.photos import synthetic_photo

    files = [
        {
            "filename": f"img{i}.jpg",
            "content": _b64(synthetic_photo(320, 320, i)),
            "caption": f"Matt, photo number {i}, outdoors",
        }
        for i in range(IMAGES)
    ]
    answer = handler({"id": "b", "input": {"type": "upload_training_data", "training_name": "bench", "files": files}})
    assert answer["status"] == "success", answer


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def trainer_config(model: Path, steps: int, cached: bool) -> str:
    flag = "true" if cached else "false"
    return f"""
job: extension
config:
  name: bench_{"cached" if cached else "uncached"}
  process:
  - type: sd_trainer
    device: cpu
    network: {{type: lora, linear: {RANK}, linear_alpha: {RANK}}}
    save: {{save_every: 100000}}
    datasets:
    - folder_path: bench
      caption_dropout_rate: 0.0
      cache_latents: {flag}
      resolution: [{RESOLUTION}]
    train:
      batch_size: {BATCH}
      steps: {steps}
      gradient_checkpointing: false
      optimizer: adamw
      lr: 1e-4
      dtype: fp32
      seed: 0
      cache_text_embeddings: {flag}
    model: {{name_or_path: {model}, arch: sd15}}
"""


def run_trainer(model: Path, steps: int, cached: bool) -> tuple[list[float], float]:
    """Per-step seconds and the set-up time (load + caching) of one trainer run."""
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest

    infos: list[dict] = []
    started = time.perf_counter()
    request = TrainWithYamlRequest(
        type="train_with_yaml", yaml_config=trainer_config(model, steps, cached), resume=False
    )
    answer = train_with_yaml(request, progress=infos.append)
    total = time.perf_counter() - started
    step_times = [info["s_per_step"] for info in infos]
    assert answer["status"] == "success"
    return step_times[WARMUP:], total - sum(step_times)


def run_minimal_loop(model: Path, dataset: Path, steps: int) -> tuple[list[float], float]:
    """diffusers' text-to-image LoRA example, reduced to its loop: encode, noise, predict, step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    from fastbackend.training.families.sd15 import SD15

    started = time.perf_counter()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    targets = SD15().lora_targets(unet)  # the same layers as the trainer's, for a fair comparison
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images, captions = [], []
    for path in sorted(dataset.glob("*.jpg")):
        image = Image.open(path).convert("RGB").resize((RESOLUTION, RESOLUTION))
        images.append(
            torch.tensor(list(image.getdata()), dtype=torch.float32).view(RESOLUTION, RESOLUTION, 3).permute(2, 0, 1)
            / 127.5
            - 1
        )
        captions.append(path.with_suffix(".txt").read_text())
    setup = time.perf_counter() - started
    rng = random.Random(0)
    times = []
    for _ in range(steps):
        step_started = time.perf_counter()
        picks = rng.sample(range(len(images)), BATCH)
        with torch.no_grad():
            latents = (
                vae.encode(torch.stack([images[i] for i in picks])).latent_dist.sample() * vae.config.scaling_factor
            )
            ids = tokenizer(
                [captions[i] for i in picks],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            text = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - step_started)
    return times[WARMUP:], setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    root = Path(tempfile.mkdtemp(prefix="fastbackend-bench-"))
    os.environ["FASTBACKEND_DATA_DIR"] = str(root)
    try:
        from handler_fast import handler

        model = root / "models" / "sd15-bench"
        build_model(model)
        upload_dataset(handler)
        dataset = root / "training_data" / "bench"
        rows = {
            "minimal diffusers+peft loop": ([], []),
            "trainer, caching off": ([], []),
            "trainer, caching on": ([], []),
        }
        for _ in range(args.rounds):
            for name in rows:
                if name.startswith("minimal"):
                    steps, setup = run_minimal_loop(model, dataset, args.steps + WARMUP)
                else:
                    steps, setup = run_trainer(model, args.steps + WARMUP, cached=name.endswith("on"))
                rows[name][0].extend(steps)
                rows[name][1].append(setup)
        report(rows, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(rows: dict[str, tuple[list[float], list[float]]], args) -> None:
    base = statistics.median(rows["minimal diffusers+peft loop"][0])
    print(
        f"SD-1.5-shaped UNet (64, 128, 256), {RESOLUTION} px, batch {BATCH}, rank {RANK}, "
        f"{args.steps} timed steps x {args.rounds} rounds, {args.threads} threads"
    )
    print(f"{'run':<30}{'s/step':>9}{'ratio':>8}{'set-up s':>10}")
    for name, (steps, setups) in rows.items():
        median = statistics.median(steps)
        print(f"{name:<30}{median:>9.3f}{median / base:>8.2f}{statistics.median(setups):>10.2f}")


if __name__ == "__main__":
    main()
