"""A model's cost as segmentation papers report it beside its parameters: the multiply-adds of one
forward pass on one image (what CIRKD's counter calls "FLOPs (G)": convolutions and matrix
products, one per multiply-add; normalisation, activations and resizing not counted).

Counted by torch's FlopCounterMode (which counts two FLOPs per multiply-add) from the operations'
real output shapes, so a dilated or strided convolution counts what it computes. The forward runs
on meta tensors: shapes only, nothing computed or allocated, whatever device the model is on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def multiply_adds(model: nn.Module, size: tuple[int, int], channels: int = 3) -> int:
    """Multiply-adds of ``model``'s forward on one ``channels`` x H x W image, in eval mode (the
    model's own mode is restored)."""
    meta = {name: torch.empty_like(t, device="meta") for name, t in (*model.named_parameters(), *model.named_buffers())}
    image = torch.empty(1, channels, *size, device="meta")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            functional_call(model, meta, (image,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
