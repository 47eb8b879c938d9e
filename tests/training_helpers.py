"""Shared set-up for training tests: a tiny model on the volume, a small dataset, the user's YAML."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from handler_fast import handler
from tests.photos import b64, nine_photos

USER_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "training.yaml"


def fixture_yaml() -> str:
    """The config the user trains with, as they wrote it."""
    return USER_CONFIG.read_text()


def install_model(tiny_models: Path, data_root: Path, arch: str) -> str:
    """Copy a tiny model onto the volume, where a user's own model folder would be; returns its path."""
    target = data_root / "models" / arch
    if not target.exists():
        shutil.copytree(tiny_models / arch, target)
    return f"/workspace/models/{arch}"


def upload_photos(count: int = 3, name: str = "matt_training_test") -> dict:
    photos = nine_photos()[:count]
    answer = handler(
        {
            "id": "up",
            "input": {
                "type": "upload_training_data",
                "training_name": name,
                "files": [{"filename": n, "content": b64(d), "caption": c} for n, d, c in photos],
            },
        }
    )
    assert answer["status"] == "success", answer
    return answer


def user_yaml(
    model_path: str, arch: str = "flux", steps: int = 4, resolutions=(64,), replacements: dict[str, str] | None = None
) -> str:
    """The fixture YAML with only the model path, steps and resolutions changed (and sample sizes made tiny)."""
    text = fixture_yaml()
    text = text.replace("name_or_path: black-forest-labs/FLUX.1-dev", f"name_or_path: {model_path}")
    text = text.replace("steps: 2000", f"steps: {steps}")
    text = text.replace(
        "      - 512\n      - 768\n      - 1024\n      - 1280\n", "".join(f"      - {r}\n" for r in resolutions)
    )
    if arch != "flux":
        text = text.replace("is_flux: true", f"arch: {arch}")
    text = text.replace("width: 1024", "width: 64").replace("height: 1280", "height: 64")
    text = text.replace("sample_steps: 20", "sample_steps: 2")
    for old, new in (replacements or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    if "seed" not in yaml.safe_load(text)["config"]["process"][0]["train"]:  # reproducible unless set
        text = text.replace("      train_unet: true\n", "      train_unet: true\n      seed: 1234\n")
    return text


def train(yaml_text: str, **extra) -> dict:
    return handler({"id": "train", "input": {"type": "train_with_yaml", "yaml_config": yaml_text, **extra}})


def write_lora_file(tiny_models: Path, arch: str, path: Path, rank: int = 2, seed: int = 7) -> Path:
    """A random LoRA on every layer a tiny model's LoRA targets, in ai-toolkit's file format for ``arch``,
    strong enough to move the output (a training adapter, for instance)."""
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for

    family = family_for("flux" if arch == "flux_schnell" else arch)
    denoiser = family.denoiser(DiffusionPipeline.from_pretrained(tiny_models / arch))
    lora_io.add_lora(denoiser, family.lora_targets(denoiser), rank, rank, 0.0, family.shared_lora_down(denoiser))
    generator = torch.Generator().manual_seed(seed)
    for name, param in denoiser.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    states = lora_io.lora_state({family.denoiser_name: denoiser})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_io.to_file_format(family, states, rank, rank), str(path))
    return path


@contextlib.contextmanager
def killed_at_step(step: int, monkeypatch) -> Iterator[None]:
    """Inside, a training run dies right after reporting ``step`` (as a lost worker would, after any
    save there); outside, runs go on as before."""
    from fastbackend.training import trainer

    real_report = trainer.report_step

    def report_then_die(run, *args):
        real_report(run, *args)
        if run.step == step:
            raise RuntimeError("worker killed")

    with monkeypatch.context() as patched:
        patched.setattr(trainer, "report_step", report_then_die)
        yield
