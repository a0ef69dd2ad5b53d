"""Keeping less for backward (``train.lean_backward``): TinyTL's memory saving, bit for bit.

Fine-tuning with frozen weights should need less memory than full fine-tuning, since a frozen
weight needs no weight gradient and so none of the input that gradient is computed from. Stock
PyTorch does not cash that in, for two reasons, and this module removes both:

- A convolution saves its input whether or not its weight trains (autograd's formula for it
  is joint). :class:`LeanConv2d` saves nothing but the weight when the weight is frozen: the
  input gradient needs only the input's shape.
- ReLU saves its whole output, since its gradient is ``grad * (out > 0)``. :class:`MaskedReLU`
  saves that sign as a mask packed eight to a byte, 1/32 of a float32 output (TinyTL, Cai et al.,
  NeurIPS 2020).

The two together matter: behind a frozen convolution the ReLU's output is kept by nobody else.
Behind a trainable one the convolution keeps it anyway, so under full fine-tuning the mask is a
little extra (a 32nd), and the option is for the ``adapt.method`` arms.

Outputs and gradients are bit-identical to the stock modules': the forwards are the same calls,
the ReLU's backward is ``threshold_backward``'s rule (a gradient passes where the output is not
``<= 0``, NaN included), and the convolution's is the same ``convolution_backward`` asked for the
input gradient alone. Both fall back to the stock path when autograd is off (a frozen prefix, an
evaluation) or when there is nothing to save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeanConv2d", "LeanMaxPool2d", "MaskedReLU", "make_lean", "masked_relu", "pack_mask", "unpack_mask"]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor packed eight elements to a byte, in memory order (pad bits are 0).

    Bit ``i`` of byte ``j`` is element ``8 * j + i``. Built one bit-column at a time, so the
    temporaries are an eighth of the mask, not copies of it.

    Args:
        mask: A contiguous ``torch.bool`` tensor of any shape.

    Returns:
        A 1-D ``uint8`` tensor of ``ceil(mask.numel() / 8)`` bytes.
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(torch.uint8).view(-1, 8)  # a bool is one byte holding 0 or 1
    packed = bits[:, 0].clone()
    for i in range(1, 8):
        packed.bitwise_or_(bits[:, i].bitwise_left_shift(i))
    return packed


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The contiguous boolean tensor of ``shape`` that :func:`pack_mask` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1)
    return bits.view(torch.bool).view(-1)[: shape.numel()].view(shape)


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _stand_in(shape: torch.Size, layout: torch.memory_format, like: torch.Tensor) -> torch.Tensor:
    """An input for a backward kernel that reads only its shape and layout (a conv's input gradient, pooling's).

    A contiguous one needs no storage of its own (an expanded scalar, as torch.nn.grad.conv2d_input
    uses); a channels-last one is allocated, so that the kernel sees the layout.
    """
    if layout == torch.channels_last:
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)
    return like.new_empty(1).expand(shape)


def _memory_order(t: torch.Tensor) -> list[int]:
    """Dimensions from the largest stride to the smallest: ``t.permute`` of them is contiguous if ``t`` is dense."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


class _MaskedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = torch.relu_(x) if inplace else torch.relu(x)
        if inplace:
            ctx.mark_dirty(x)
        # Packed in memory order (a channels-last output as its N, H, W, C view), so that the mask
        # unpacks straight into the output's strides.
        order = _memory_order(out)
        dense = out.permute(order)
        if not dense.is_contiguous():  # an overlapping or strided view: logical order, restrided later
            order, dense = list(range(out.dim())), out.contiguous()
        ctx.order, ctx.dense_shape, ctx.stride = order, dense.shape, out.stride()
        # Not "out > 0": a NaN output passes its gradient in PyTorch's rule (threshold_backward).
        # save_for_backward, not an attribute: saved-tensor hooks (the memory count) see it.
        ctx.save_for_backward(pack_mask(dense.le(0).logical_not_()))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (packed,) = ctx.saved_tensors
        passes = unpack_mask(packed, ctx.dense_shape).permute(sorted(range(len(ctx.order)), key=ctx.order.__getitem__))
        if passes.stride() != ctx.stride:
            passes = torch.empty_strided(passes.shape, ctx.stride, dtype=torch.bool, device=grad.device).copy_(passes)
        # threshold_backward's rule: the gradient where the output was not <= 0, else +0, in the
        # layout threshold_backward would give, which picks the next backward's kernel. Where the
        # gradient and the output share their strides and no dimension has size 1, torch.where
        # with the mask laid out as the output gives that layout without a float copy. Otherwise
        # (the last ReLU, whose gradient comes from the pooling laid out differently, or a 1x1
        # map) TensorIterator's choice is subtler, so ask threshold_backward itself, on a float
        # stand-in of the output's strides: the same kernel, the same layout.
        if grad.stride() == ctx.stride and 1 not in grad.shape:
            return torch.where(passes, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None
        stand_in = torch.empty_strided(grad.shape, ctx.stride, dtype=grad.dtype, device=grad.device).copy_(passes)
        return torch.ops.aten.threshold_backward(grad, stand_in, 0), None


def masked_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``relu(x)``, keeping a 1-bit mask for backward when autograd will need one."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedReLUFunction.apply(x, inplace)
    return torch.relu_(x) if inplace else torch.relu(x)


class MaskedReLU(nn.ReLU):
    """``nn.ReLU`` whose backward keeps a 1-bit mask instead of the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x)``, in place when the module says so."""
        return masked_relu(x, self.inplace)


class _FrozenWeightConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)  # a parameter, held by the model anyway; not the input
        ctx.conv = (stride, padding, dilation, groups)
        ctx.input_shape, ctx.layout = x.shape, _layout(x)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        # Only the input's shape and layout are read for the input gradient.
        stand_in = _stand_in(ctx.input_shape, ctx.layout, grad)
        need_input, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
            grad, stand_in, weight, ctx.bias_shape if need_bias else None, stride, padding, dilation, False,
            [0, 0], groups, (need_input, False, need_bias))
        return grad_input, None, grad_bias if need_bias else None, None, None, None, None


class LeanConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, while its weight is frozen, keeps no input for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution; through the lean function only while the weight is frozen and ``x`` needs a gradient."""
        lean = (not self.weight.requires_grad and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.is_grad_enabled() and x.requires_grad)
        if not lean:
            return super().forward(x)
        return _FrozenWeightConvFunction.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                               self.groups)


class _MaxPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(indices)
        ctx.pool = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.input_shape, ctx.layout = x.shape, _layout(x)
        ctx.mark_non_differentiable(indices)
        return out

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        # The gradient is scattered by the indices; the input contributes its shape and layout.
        stand_in = _stand_in(ctx.input_shape, ctx.layout, grad)
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(grad, stand_in, *ctx.pool, indices)
        return grad_input, None, None, None, None, None


class LeanMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps only the indices of the maxima for backward, not its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling; through the lean function only while ``x`` needs a gradient."""
        if self.return_indices or x.dim() != 4 or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        pair = torch.nn.modules.utils._pair
        stride = self.stride if self.stride is not None else self.kernel_size
        return _MaxPoolFunction.apply(x, pair(self.kernel_size), pair(stride), pair(self.padding),
                                      pair(self.dilation), self.ceil_mode)


def make_lean(model: nn.Module) -> int:
    """Turns every ``nn.Conv2d``, ``nn.ReLU`` and ``nn.MaxPool2d`` of ``model`` into its lean subclass, in place.

    The modules keep their parameters, names and attributes (only the class changes), so the
    state dict, the freeze mask, peft's adapters and checkpoints are unchanged. ReLUs called as
    functions (``F.relu``) are not reached.

    Returns:
        How many modules changed (0 when there are none, or they are lean already).
    """
    lean = {nn.Conv2d: LeanConv2d, nn.ReLU: MaskedReLU, nn.MaxPool2d: LeanMaxPool2d}
    changed = 0
    for module in model.modules():
        subclass = lean.get(type(module))
        if subclass is not None:
            module.__class__ = subclass
            changed += 1
    return changed
