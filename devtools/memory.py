"""What autograd keeps for the backward pass, counted on the CPU: the activation side of the memory plan.

``kept_bytes(step, model)`` runs ``step`` (a forward and its loss) and adds up the distinct storages
autograd keeps for the backward pass, the model's parameters left out (the plan counts weights
apart). A GPU keeps the same tensors, so this is the activation memory a step holds when its
forward pass ends. With ``checkpointing`` the model's checkpointed blocks keep only their inputs;
the backward pass then runs each block again, holding one block's activations at a time: the
largest of those is ``largest_block``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Kept:
    total: int  # bytes kept for the backward pass when the forward pass ends
    largest_block: int = 0  # with checkpointing: one block's activations, held again while it re-runs


def kept_bytes(step: Callable[[], torch.Tensor], model, checkpointing: bool = False) -> Kept:
    """What autograd keeps while ``step`` runs over ``model`` (a diffusers model)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    largest = 0

    def note(into: dict[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                into[storage.data_ptr()] = storage.nbytes()
            return tensor

        return pack

    def checkpoint(block, *args, **kwargs):
        """diffusers' checkpointing, counting what it keeps (the block's inputs) and, by one extra
        run, what the block holds while the backward pass re-runs it."""
        nonlocal largest
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor):
                note(seen)(value)
        own: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(note(own), lambda tensor: tensor):
            block(*args, **kwargs)
        largest = max(largest, sum(own.values()))
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)

    with contextlib.ExitStack() as stack:
        if checkpointing:
            stack.enter_context(_checkpointing(model, checkpoint))
        with torch.autograd.graph.saved_tensors_hooks(note(seen), lambda tensor: tensor):
            step()
    return Kept(total=sum(seen.values()), largest_block=largest)


@contextlib.contextmanager
def _checkpointing(model, function) -> Iterator[None]:
    model.enable_gradient_checkpointing(gradient_checkpointing_func=function)
    try:
        yield
    finally:
        model.disable_gradient_checkpointing()


def published_denoiser(arch: str, **overrides):
    """The family's published denoiser (``training/shapes``) with random bf16 weights and a rank-16
    LoRA on its targets, as the trainer sets it up; ``overrides`` change its config (FLUX: depth)."""
    import json

    import diffusers

    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for
    from fastbackend.training.memory_plan import SHAPES

    family = family_for(arch)
    config = json.loads((SHAPES / arch / family.denoiser_name / "config.json").read_text()) | overrides
    model_class = getattr(diffusers, config.pop("_class_name"))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = model_class(**config)
    finally:
        torch.set_default_dtype(torch.float32)
    lora_io.add_lora(model, family.lora_targets(model), 16, 16, 0.0, family.shared_lora_down(model))
    model.train()
    return config, model


def measure(arch: str, model, size: int, text_tokens: int, checkpointing: bool) -> Kept:
    """What one ``size`` px training step of ``model`` keeps (bf16 autocast, batch 1)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from fastbackend.training.families import LossOptions, TrainingBatch, family_for

    family = family_for(arch)
    if arch == "flux":
        cond = {"prompt_embeds": torch.randn(1, text_tokens, 4096), "pooled": torch.randn(1, 768)}
        scheduler, channels = FlowMatchEulerDiscreteScheduler(shift=3.0), 16
    elif arch == "qwen_image":
        cond = {"prompt_embeds": torch.randn(1, text_tokens, 3584), "prompt_mask": torch.ones(1, text_tokens)}
        scheduler, channels = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True), 16
    elif arch.startswith("flux2"):
        cond = {"prompt_embeds": torch.randn(1, text_tokens, model.config.joint_attention_dim)}
        scheduler, channels = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), 128
    elif arch == "zimage":
        cond = {"prompt_embeds": torch.randn(1, text_tokens, 2560), "prompt_mask": torch.ones(1, text_tokens)}
        scheduler, channels = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False), 16
    else:
        cond = {"prompt_embeds": torch.randn(1, 77, model.config.cross_attention_dim)}
        if arch == "sdxl":
            cond["pooled"] = torch.randn(1, 1280)
        scheduler, channels = DDPMScheduler(), 4
    side = size // 16 if arch.startswith("flux2") else size // 8  # FLUX.2's latents come in 2x2 patches
    batch = TrainingBatch(
        latents=torch.randn(1, channels, side, side).bfloat16(),
        cond={key: value.bfloat16() for key, value in cond.items()},
        sizes=torch.tensor([[size, size, 0, 0, size, size]]),
    )

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return family.loss(None, model, batch, LossOptions(scheduler=scheduler))

    return kept_bytes(step, model, checkpointing)
