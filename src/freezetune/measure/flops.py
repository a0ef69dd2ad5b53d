"""FLOPs of one training step under a model's real ``requires_grad`` mask.

Autograd only builds backward work for tensors that need a gradient, so a frozen prefix costs no
backward FLOPs at all and a frozen layer after a trainable one costs only its input gradient.
Counting with ``torch.utils.flop_counter.FlopCounterMode`` while running forward and backward on
meta tensors (shapes only, no data) gives exactly what autograd would dispatch, without touching
data. Counting still dispatches every op through Python meta kernels (about half a second for a
ResNet18 step on a 2-core CPU), and a sweep asks for the same count again for every rate and seed of
an arm, so counts are kept per model structure, freeze mask and input shape.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def step_flops(model: nn.Module, batch_size: int, image_size: int, num_classes: int | None = None) -> dict:
    """Counts forward and backward FLOPs for one training step, overall and per top-level module.

    Forward and backward run under one counter so that backward work is attributed to the module
    it belongs to; the per-module backward figure is the step's count minus the forward count.

    Args:
        model: The model with its freeze mask applied (left untouched; a meta copy is counted).
        batch_size: Images per step.
        image_size: Height and width of each image.
        num_classes: Classes for the loss targets; inferred from the output when None.

    Returns:
        ``{"forward": int, "backward": int, "total": int, "by_module": {name: {"forward": int,
        "backward": int}}}`` (FLOPs, a multiply-add counting 2; ``by_module`` keyed by top-level
        module name, e.g. ``layer3``).
    """
    key = (structure_key(model), batch_size, image_size, num_classes)
    if key not in _COUNTS:
        _COUNTS[key] = _count_step(model, batch_size, image_size, num_classes)
        while len(_COUNTS) > _MAX_COUNTS:
            _COUNTS.popitem(last=False)
    _COUNTS.move_to_end(key)
    return copy.deepcopy(_COUNTS[key])  # callers may edit their copy (see without_prefix)


# step_flops's counts, oldest first: a few hundred bytes each.
_COUNTS: OrderedDict[tuple, dict] = OrderedDict()
_MAX_COUNTS = 256


def structure_key(model: nn.Module) -> tuple:
    """What a FLOP count depends on: the module tree, parameter shapes and the ``requires_grad`` mask.

    ``repr`` names every module's class and its hyperparameters (channels, kernel, stride, groups),
    which fix the arithmetic of the standard layers; the weights' values do not matter.
    """
    params = tuple((name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters())
    return type(model).__module__, type(model).__qualname__, repr(model), params


def _count_step(model: nn.Module, batch_size: int, image_size: int, num_classes: int | None) -> dict:
    """Counts one training step on a meta copy of ``model`` (see :func:`step_flops`)."""
    meta = meta_copy(model)
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    with FlopCounterMode(display=False, custom_mapping=_GROUPED_CONV_FIX) as counter:
        logits = meta(x)
        classes = num_classes or logits.shape[1]
        y = torch.zeros(batch_size, dtype=torch.long, device="meta").clamp_(0, classes - 1)
        loss = nn.functional.cross_entropy(logits, y)
        after_forward = _top_level(counter.get_flop_counts())
        if loss.requires_grad:
            loss.backward()
        after_step = _top_level(counter.get_flop_counts())
    forward = after_forward.pop("", 0)
    total = after_step.pop("", 0)
    by_module = {
        name: {"forward": after_forward.get(name, 0), "backward": flops - after_forward.get(name, 0)}
        for name, flops in after_step.items()
    }
    return {"forward": forward, "backward": total - forward, "total": total, "by_module": by_module}


def without_prefix(flops: dict, modules: list[str], forward_of: dict[str, int] | None = None) -> dict:
    """A :func:`step_flops` result minus the forward FLOPs of the given (frozen, cached) modules.

    With the feature cache, a step after the first epoch reads the frozen prefix's output instead of
    computing it; being frozen, the prefix had no backward FLOPs to begin with.

    Args:
        flops: A :func:`step_flops` result.
        modules: Top-level modules (``conv1``) or submodules (a ResNet block, ``layer2.0``).
        forward_of: Each submodule's forward FLOPs for the step's batch
            (:func:`submodule_forward_flops`); top-level ones are read from ``flops``.

    Returns:
        The same shape: a cached top-level module leaves ``by_module``, and a cached submodule's
        forward is taken from its top-level module's.
    """
    by_module = {k: dict(v) for k, v in flops["by_module"].items()}
    skipped = 0
    for m in modules:
        if "." not in m:
            skipped += by_module.pop(m, {}).get("forward", 0)
            continue
        top = m.split(".", 1)[0]
        part = (forward_of or {})[m]
        skipped += part
        by_module[top]["forward"] -= part
    return {"forward": flops["forward"] - skipped, "backward": flops["backward"],
            "total": flops["total"] - skipped, "by_module": by_module}


def submodule_forward_flops(model: nn.Module, batch_size: int, image_size: int, modules: list[str]) -> dict[str, int]:
    """Forward FLOPs of a batch through each dotted module of ``modules`` (top-level ones are left out).

    Convolution and matmul FLOPs grow linearly with the batch, so one image is counted and scaled.
    """
    dotted = [m for m in modules if "." in m]
    if not dotted:
        return {}
    per_image = forward_flops_by_module(model, image_size)
    return {m: per_image.get(m, 0) * batch_size for m in dotted}


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                         transposed, _output_padding, groups, output_mask, out_shape=None, **_) -> int:
    """The ``convolution_backward`` FLOP formula of torch, with grouped weight gradients fixed.

    ``torch.utils.flop_counter`` counts the weight gradient as a dense (C_in x C_out) convolution
    whatever ``groups`` is, so depthwise convolutions (MobileNet, EfficientNet, ConvNeXt) came out
    ``groups`` times too expensive in backward. The input gradient is counted as torch does.
    """
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        def t(shape):
            return [shape[1], shape[0], *shape[2:]]

        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(t(a), t(b), t(out_shape[1]), transposed=False) // groups
    return flops


_GROUPED_CONV_FIX = {torch.ops.aten.convolution_backward: _conv_backward_flops}


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the model on the meta device, with the same ``requires_grad`` mask.

    The copy's tensors are shapes without data: no weight is ever cloned, so this is quick and
    costs no memory even for a model on a GPU.
    """
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _top_level(counts: dict[str, dict]) -> dict[str, int]:
    """Sums a FlopCounterMode breakdown into ``{"": whole model, "layer1": ..., ...}``."""
    out: dict[str, int] = {"": int(sum(counts.get("Global", {}).values()))}
    for name, per_op in counts.items():
        # Names are "Global", the root's class name, then "Root.child.path"; keep "Root.child".
        if name.count(".") == 1:
            out[name.split(".", 1)[1]] = int(sum(per_op.values()))
    return out


def forward_flops_by_module(model: nn.Module, image_size: int) -> dict[str, int]:
    """Forward FLOPs for one image per dotted module name (``""`` is the whole model)."""
    # Eval mode: in train mode BatchNorm refuses one value per channel (layer4 is 1x1 at 32 px);
    # FLOPs do not depend on the mode. The copy's mode changes, never the model's.
    meta = meta_copy(model).eval()
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
