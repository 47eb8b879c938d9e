"""The CUDA check, for a session that has a GPU: one script, a few minutes.

1. The tiny FLUX / SDXL / SD 1.5 pipelines trained on the GPU through ``train_with_yaml`` with
   the user's settings: bf16 (CUDA only), and adamw8bit, ``quantize`` and gradient checkpointing
   on their CUDA kernels (the CPU suite runs their CPU ones); the run's warnings must not say
   any of them fell back.
2. A full-size FLUX.1-dev transformer (its published config, random bf16 weights, no download)
   with a rank-16 LoRA through the trainer's own loss: seconds per step and peak memory at
   1024 px, with and without gradient checkpointing (random latents and text embeddings of the
   real shapes: 128x128x16 latents, 512 T5 tokens of 4096, a 768 pooled vector).

    .venv/bin/python -m benchmarks.gpu_check              # on a GPU
    .venv/bin/python -m benchmarks.gpu_check --smoke      # on a CPU: tiny shapes, to check the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from devtools.tiny import TINY_FLUX_TRANSFORMER

# FLUX.1-dev's transformer, as published (transformer/config.json).
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def tiny_pipelines_on_device(device: str) -> None:
    """Train each tiny architecture with the CUDA-only settings and print what the run reported."""
    import base64

    from devtools import demo, tiny
    from devtools.photos import synthetic_photo
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest
    from handler_fast import handler

    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["FASTBACKEND_DATA_DIR"] = str(root)
    files = [
        {
            "filename": f"IMG_{i}.jpg",
            "content": base64.b64encode(synthetic_photo(384, 320 + 32 * i, i)).decode(),
            "caption": f"Matt, photo {i}",
        }
        for i in range(3)
    ]
    handler({"id": "u", "input": {"type": "upload_training_data", "training_name": demo.DATASET, "files": files}})
    print(f"{'tiny model':<12}{'s':>7}{'final loss':>12}  warnings")
    for arch in ("flux", "sdxl", "sd15"):
        folder = tiny.build(arch, root / "models" / arch)
        text = demo.tiny_config(str(folder), arch, steps=6).replace("device: cuda:0", f"device: {device}")
        started = time.perf_counter()
        answer = train_with_yaml(TrainWithYamlRequest(type="train_with_yaml", yaml_config=text, resume=False))
        print(f"{arch:<12}{time.perf_counter() - started:>7.1f}{answer['final_loss']:>12.4f}  {answer['warnings']}")


def full_size_flux(device: str, config: dict, size: int, steps: int, checkpointing: bool) -> tuple[float, float]:
    """Median seconds per LoRA step and peak GPU memory (GB) of a random-weight FLUX transformer."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from fastbackend.training import lora_io
    from fastbackend.training.families import LossOptions, TrainingBatch
    from fastbackend.training.families.flux import Flux

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_default_dtype(dtype)  # initialise the 12B weights in bf16 directly
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config)
    torch.set_default_dtype(torch.float32)
    params = lora_io.add_lora(transformer, Flux().lora_targets(transformer), rank=16, alpha=16, dropout=0.0)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    if cuda:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    channels = config["in_channels"] // 4
    latent = size // 8
    text_tokens = 512 if cuda else 16
    batch = TrainingBatch(
        latents=torch.randn(1, channels, latent, latent, device=device, dtype=dtype),
        cond={
            "prompt_embeds": torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype),
            "pooled": torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
        },
        sizes=torch.zeros(1, 6),
    )
    options = LossOptions(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=cuda):
            loss = Flux().loss(None, transformer, batch, options)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
    del transformer, optimizer, params
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times[2:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script itself")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import torch

    device = "cpu" if args.smoke else "cuda:0"
    if not args.smoke:
        props = torch.cuda.get_device_properties(0)
        memory = props.total_memory / 1e9
        print(f"GPU: {props.name}, {memory:.0f} GB, torch {torch.__version__}, CUDA {torch.version.cuda}")
    tiny_pipelines_on_device(device)
    config, size = (TINY_FLUX_TRANSFORMER, 64) if args.smoke else (FLUX_DEV, 1024)
    print(f"\n{'FLUX.1-dev transformer, LoRA rank 16' if not args.smoke else 'tiny FLUX (smoke)'}, {size} px, batch 1")
    print(f"{'gradient checkpointing':<26}{'s/step':>8}{'peak GB':>9}")
    for checkpointing in (True, False):
        seconds, peak = full_size_flux(device, config, size, args.steps, checkpointing)
        print(f"{'on' if checkpointing else 'off':<26}{seconds:>8.3f}{peak:>9.1f}")


if __name__ == "__main__":
    main()
