"""Sample images during training: the config's prompts through the pipeline with the LoRA on."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch

from fastbackend.images import PIL_FORMATS
from fastbackend.storage import atomic_write_bytes
from fastbackend.training import data, lora_io
from fastbackend.training.caching import encoders_stay, offload_encoders
from fastbackend.training.run import Run


def should_sample(run: Run, final: bool = False) -> bool:
    """Samples every ``sample_every`` steps and at the end, when there are prompts and sampling is on."""
    sample_cfg = run.process.sample
    if sample_cfg is None or not run.process.sample_prompts:
        return False
    if final:
        return True
    on_schedule = run.step % sample_cfg.sample_every == 0 and run.step >= sample_cfg.sample_start_step
    return on_schedule and run.step < run.process.train.steps


@torch.no_grad()
def sample(run: Run, should_stop: Callable[[], bool] = lambda: False) -> list[Path]:
    """The config's prompts through the pipeline with the LoRA (EMA weights when on), saved under
    samples/; a stop request ends the round between two denoising steps, the image in the making
    left unsaved (the step is saved by then, or the trainer saves it as it stops)."""
    sample_cfg = run.process.sample
    if sample_cfg is None:
        return []
    width, height = run.family.snap_size(run.pipe, sample_cfg.width, sample_cfg.height)
    device = run.denoiser.device
    # The prompts were encoded before training when the text encoders left the device: then only
    # the VAE comes back. (diffusers runs a pipeline split across devices on its accelerator.)
    cached = run.texts.samples
    for module in [run.pipe.vae] if cached else run.family.encoders(run.pipe):
        module.to(device)
    for module in run.lora_modules.values():
        module.eval()
    paths = []
    try:
        with run.ema_weights(), lora_io.assistant_off(run.denoiser):
            for index, prompt in enumerate(sample_cfg.all_prompts):
                if should_stop():
                    break
                seed = sample_cfg.seed + index if sample_cfg.walk_seed else sample_cfg.seed
                text = data.sample_prompt(prompt, run.process.trigger_word)
                if text in cached:
                    prompt_arguments = {key: data.to_device(value, device) for key, value in cached[text].items()}
                else:
                    negative = sample_cfg.negative_prompt
                    prompt_arguments = {"prompt": text, **run.family.sample_kwargs(run.pipe, negative)}
                try:
                    image = run.pipe(
                        **prompt_arguments,
                        num_inference_steps=sample_cfg.sample_steps,
                        **run.family.guidance_arguments(sample_cfg.guidance_scale),
                        width=width,
                        height=height,
                        generator=torch.Generator("cpu").manual_seed(seed),
                        callback_on_step_end=between_steps(_end_round_if(should_stop)),
                    ).images[0]
                except _RoundStopped:  # a FLUX image at 1024 px takes half a minute: not worth waiting for
                    break
                paths.append(save_image(image, run.folder.sample_path(run.step, index, sample_cfg.format)))
    finally:
        for module in run.lora_modules.values():
            module.train()
        if not encoders_stay(run.process, run.trains_text_encoder):
            offload_encoders(run.family, run.pipe)
    run.samples += paths
    return paths


class _RoundStopped(Exception):
    """Raised from the pipeline's step callback to leave the image in the making."""


def between_steps(check: Callable[[], None]) -> Callable:
    """A pipeline's ``callback_on_step_end`` that runs ``check`` (which raises to stop) after each step."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        check()
        return tensors

    return callback


def _end_round_if(should_stop: Callable[[], bool]) -> Callable[[], None]:
    def check() -> None:
        if should_stop():
            raise _RoundStopped

    return check


def save_image(image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[path.suffix[1:]])
    atomic_write_bytes(path, buffer.getvalue())
    return path
