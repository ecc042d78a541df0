"""How a model runs for a block of inference: every module in eval mode, the image tower in its
own memory layout; each restored afterwards."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run a block with `model` and all its submodules in eval mode, then restore each one's
    own mode, even when the block raises (an interrupted notebook cell must not leave dropout
    off for the next training run; frozen towers kept in eval mode stay so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def image_layout(model):
    """-> the memory format to feed the image tower in this block: its adapter's own (channels-last
    for timm convolutional towers, ~1.5x faster on a CPU, measured), whose weights are switched for
    the block and restored after."""
    tower = model.image_encoder
    if tower.memory_format == torch.contiguous_format:
        yield torch.contiguous_format
        return
    tower.to(memory_format=tower.memory_format)
    try:
        yield tower.memory_format
    finally:
        tower.to(memory_format=torch.contiguous_format)
