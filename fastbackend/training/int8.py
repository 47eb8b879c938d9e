"""An 8-bit linear layer for frozen base weights that keeps nothing for the backward pass.

bitsandbytes' ``Linear8bitLt`` keeps each call's input on its autograd context (for the
weight's gradient, which frozen base weights never need), where gradient checkpointing cannot
drop it: with ``quantize`` and checkpointing together, every 8-bit layer's input stayed in
memory. Here the forward is bitsandbytes' own, and the backward needs only the int8 weights and
their row scales: the input's gradient is ``grad @ (CB * SCB / 127)``, the same product
bitsandbytes computes for it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch


class FrozenLinear8bit(bnb.nn.Linear8bitLt):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenInt8Matmul.apply(x, self)


class _FrozenInt8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FrozenLinear8bit) -> torch.Tensor:
        ctx.layer = layer  # the layer, not the input: its int8 weights live on anyway
        return bnb.nn.Linear8bitLt.forward(layer, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        codes = layer.state.CB if layer.state.CB is not None else layer.weight.data
        scales = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        weight = codes.to(grad.dtype) * (scales.to(grad.dtype) / 127).unsqueeze(1)
        return grad @ weight, None
