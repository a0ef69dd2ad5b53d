"""FLOPs of one training step under a model's real ``requires_grad`` mask.

Autograd only builds backward work for tensors that need a gradient, so a frozen prefix costs no
backward FLOPs at all and a frozen layer after a trainable one costs only its input gradient.
Counting with ``torch.utils.flop_counter.FlopCounterMode`` while running forward and backward on
meta tensors (shapes only, no data) gives exactly what autograd would dispatch, instantly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def step_flops(model: nn.Module, batch_size: int, image_size: int, num_classes: int | None = None) -> dict:
    """Counts forward and backward FLOPs for one training step.

    Args:
        model: The model with its freeze mask applied (left untouched; a meta copy is counted).
        batch_size: Images per step.
        image_size: Height and width of each image.
        num_classes: Classes for the loss targets; inferred from the output when None.

    Returns:
        ``{"forward": int, "backward": int, "total": int}`` (FLOPs, a multiply-add counting 2).
    """
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as fwd:
        logits = meta(x)
        classes = num_classes or logits.shape[1]
        y = torch.zeros(batch_size, dtype=torch.long, device="meta").clamp_(0, classes - 1)
        loss = nn.functional.cross_entropy(logits, y)
    forward = fwd.get_total_flops()
    backward = 0
    if loss.requires_grad:
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        backward = bwd.get_total_flops()
    return {"forward": int(forward), "backward": int(backward), "total": int(forward + backward)}


def forward_flops_by_module(model: nn.Module, image_size: int) -> dict[str, int]:
    """Forward FLOPs for one image per dotted module name (``""`` is the whole model)."""
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x)
    out: dict[str, int] = {}
    for name, per_op in counter.get_flop_counts().items():
        # Names are "Global" (the whole model), the root's class name, then "Root.child.path".
        if name == "Global":
            key = ""
        elif "." in name:
            key = name.split(".", 1)[1]
        else:
            continue
        out[key] = int(sum(per_op.values()))
    return out
