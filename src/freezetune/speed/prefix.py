"""Frozen-prefix execution: run the frozen input side of a ResNet as cheaply as inference.

When the stages from the input up to some point are all frozen, nothing there needs autograd, and
with ``batchnorm: frozen`` each BatchNorm is a fixed affine map that can be folded into the
convolution before it. :class:`SplitForward` runs that prefix under ``torch.no_grad()`` with folded
BatchNorm (on a private copy, so the model's own weights and buffers are never touched), then the
trainable suffix normally. A frozen BatchNorm *after* a trainable layer is left alone: it is not in
the prefix, runs in eval mode, and still passes gradients to the trainable layers before it.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from freezetune.config import Config
from freezetune.freezing.plan import FreezePlan
from freezetune.measure.flops import step_flops, submodule_forward_flops, without_prefix
from freezetune.models.catalog import block_points, forward_modules, is_resnet, stage_blocks, stages

_CONV_BN = re.compile(r"^conv(\d+)$")


def supports_prefix(model_name: str) -> bool:
    """Whether frozen-prefix execution (split, folding, cache) is implemented for this model: ResNets.

    The one place this rule lives; :mod:`freezetune.speed.execution` gives the reason to users.
    """
    return is_resnet(model_name)


def frozen_prefix(model: nn.Module, model_name: str) -> list[str]:
    """Returns the freeze points, from the input on, whose parameters are all frozen (may be empty).

    Whole stages are named as stages (``layer1``); a stage frozen only in its first blocks adds
    those block points (``layer2.0``), so the prefix can end inside a stage. Always empty for
    models other than ResNets: splitting and folding are only implemented for ResNet's layout, so
    every other model runs its plain forward.
    """
    if not supports_prefix(model_name):
        return []
    prefix = []
    blocks = block_points(model_name)
    for stage, modules in stages(model_name).items():
        if stage == "head":
            break
        if not _trains(model, modules):
            prefix.append(stage)
            continue
        for point in stage_blocks(model_name, stage):
            if _trains(model, blocks[point]):
                break
            prefix.append(point)
        break
    return prefix


def _trains(model: nn.Module, modules: tuple[str, ...]) -> bool:
    return any(p.requires_grad for m in modules for p in model.get_submodule(m).parameters())


def prefix_batchnorm_frozen(model: nn.Module, model_name: str, prefix: list[str], plan: FreezePlan) -> bool:
    """Whether every BatchNorm in the prefix is frozen (eval mode), so it may be folded or cached."""
    frozen = set(plan.frozen_bn)
    for name in prefix_modules(model_name, prefix):
        for sub, mod in model.get_submodule(name).named_modules():
            full = f"{name}.{sub}" if sub else name
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and full not in frozen:
                return False
    return True


def fold_batchnorm(module: nn.Module, memory_format: torch.memory_format | None = None) -> nn.Module:
    """Returns an eval-mode, frozen copy of ``module`` with BatchNorm folded into convolutions.

    Folds each ``convN``/``bnN`` sibling pair (the stem's conv1/bn1 and every block's) and each
    two-element ``Sequential(conv, bn)`` (ResNet's ``downsample``).

    The copy's only new memory is the folded convolutions' weights and biases (about the size of
    the prefix's parameters): the module structure is copied with every tensor shared, and each
    folded weight is made directly in ``memory_format``, one convolution at a time, so no second
    copy of the prefix ever exists, even for a moment.

    Args:
        module: The frozen prefix (left untouched).
        memory_format: The layout of the folded weights (``torch.channels_last`` on CPU), or None.
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    folded = copy.deepcopy(module, shared).eval()
    for parent in folded.modules():
        for name, child in list(parent.named_children()):
            m = _CONV_BN.match(name)
            bn = getattr(parent, f"bn{m.group(1)}", None) if m else None
            if isinstance(child, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, name, _fused(child, bn, memory_format))
                setattr(parent, f"bn{m.group(1)}", nn.Identity())
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            conv, bn = parent[0], parent[1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent[0], parent[1] = _fused(conv, bn, memory_format), nn.Identity()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _fused(conv: nn.Conv2d, bn: nn.BatchNorm2d, memory_format: torch.memory_format | None) -> nn.Conv2d:
    """A new convolution computing ``bn(conv(x))`` in eval mode; shares nothing it does not need."""
    keep = {id(t): t for t in (*conv.parameters(), *conv.buffers())}
    fused = copy.deepcopy(conv, keep)  # hyperparameters copied, tensors shared until replaced below
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
    if memory_format is not None:
        weight = nn.Parameter(weight.detach().contiguous(memory_format=memory_format), requires_grad=False)
    fused.weight, fused.bias = weight, bias
    return fused


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (for the folded copy's cost)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class SplitForward:
    """Calls a ResNet as ``suffix(prefix(x))`` with the frozen prefix run without autograd.

    Args:
        model: The (frozen-as-planned) ResNet; its modules are used for the suffix.
        model_name: torchvision name, for the stage order.
        prefix: Freeze points of the frozen prefix, stages and blocks (see :func:`frozen_prefix`).
        fold: Fold BatchNorm into the prefix's convolutions (only valid when it is frozen).
        prefix_channels_last: Run the prefix in channels-last layout. On CPU this made the
            prefix 1.1-5.7x faster (ResNet18, 64 px, batch 32; through layer4 to stem): oneDNN's
            channels-last convolutions and, above all, max pooling (about 18x faster than the
            NCHW kernel) beat the NCHW ones. The input is converted; the folded copy's weights
            are made channels-last, while an unfolded prefix (the model's own modules) keeps its
            weights as they are.
        suffix_channels_last: The layout the suffix expects (``train.channels_last``).
    """

    def __init__(self, model: nn.Module, model_name: str, prefix: list[str], fold: bool,
                 prefix_channels_last: bool = False, suffix_channels_last: bool = False):
        self.model = model
        names = prefix_modules(model_name, prefix)
        self.names = names
        # Sequential keys cannot hold dots: a block layer2.0 is keyed layer2_0.
        seq = nn.Sequential(OrderedDict((_key(n), model.get_submodule(n)) for n in names))
        self.prefix_format = torch.channels_last if prefix_channels_last else None
        # Unfolded, the prefix is the model's own modules (its weights keep their layout; a
        # channels-last input still takes the channels-last kernels). Folded, it is a private copy.
        self.prefix = fold_batchnorm(seq, self.prefix_format) if fold else seq
        self._uncompiled = self.prefix  # kept apart: torch.compile may replace self.prefix
        self.folded_bytes = parameter_bytes(self.prefix) if fold else 0
        self.suffix = [n for n in forward_modules(model_name) if n not in names]
        self.folded = fold
        self.suffix_format = torch.channels_last if suffix_channels_last else torch.contiguous_format

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output (no autograd graph), in the suffix's layout."""
        with torch.no_grad():
            if self.prefix_format is None:
                return self.prefix(x)
            h = self.prefix(x.contiguous(memory_format=self.prefix_format))
            return h.contiguous(memory_format=self.suffix_format)

    def continues(self, done: list[str]) -> bool:
        """Whether the modules ``done`` (a shorter prefix's) are the start of this prefix."""
        return self.names[: len(done)] == list(done)

    def features_after(self, h: torch.Tensor, done: list[str]) -> torch.Tensor:
        """The prefix's output from the output of its first modules ``done`` (a shorter prefix).

        The modules run are this prefix's own (folded) ones, in the same layout as
        :meth:`features`, so the result is what :meth:`features` gives for the same images, bit
        for bit (tested on CPU). Under ``train.compile`` they run uncompiled, so the last bits
        may differ from the compiled prefix's.

        Raises:
            ValueError: If ``done`` is not the start of this prefix.
        """
        if not self.continues(done):
            raise ValueError(f"{', '.join(done)} is not the start of the prefix {', '.join(self.names)}")
        with torch.no_grad():
            if self.prefix_format is not None:
                h = h.contiguous(memory_format=self.prefix_format)
            for name in self.names[len(done):]:
                h = self.prefix_module(name)(h)
            return h if self.prefix_format is None else h.contiguous(memory_format=self.suffix_format)

    def prefix_module(self, name: str) -> nn.Module:
        """The module the prefix runs for one of :attr:`names` (a folded copy when BatchNorm is folded)."""
        return getattr(self._uncompiled, _key(name))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The trainable suffix from prefix features to logits."""
        for name in self.suffix:
            if name == "fc":
                h = torch.flatten(h, 1)
            h = self.model.get_submodule(name)(h)
        return h

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.head(self.features(x))


def prefix_modules(model_name: str, prefix: list[str]) -> list[str]:
    """The modules the prefix's freeze points cover, one per block (``conv1`` ... ``layer2.0``).

    A whole stage is listed block by block (``layer1`` as ``layer1.0``, ``layer1.1``), so a prefix
    that grows from a stage into the next one's first block, or from a block to the whole stage,
    continues the shorter one module for module (see :meth:`SplitForward.continues`).
    """
    fine = block_points(model_name)
    out: list[str] = []
    for point in prefix:
        inside = (point,) if point in fine else stage_blocks(model_name, point)  # a stage made of blocks
        out.extend(m for p in inside for m in fine[p])
    return out


def _key(module: str) -> str:
    return module.replace(".", "_")


def training_step_flops(model: nn.Module, config: Config, cached_prefix: list[str] | None) -> dict:
    """FLOPs of one training step of ``config``'s batch; with a feature cache, of a step reading it.

    Args:
        model: The model (its weights do not matter).
        config: The run's config (model name, batch and image size, classes).
        cached_prefix: The frozen-prefix stages whose output the feature cache holds, or None
            without a cache: a later-epoch step then skips their forward pass.
    """
    data = config.data
    flops = step_flops(model, data.batch_size, data.image_size, config.model.num_classes)
    if cached_prefix is None:
        return flops
    return without_prefix(flops, *_cached_modules(model, config.model.name, cached_prefix, data.batch_size,
                                                  data.image_size))


def cached_share(model: nn.Module, model_name: str, prefix: list[str], batch_size: int, image_size: int) -> float:
    """The prefix's forward FLOPs as a share of one training step's (what the feature cache can skip)."""
    flops = step_flops(model, batch_size, image_size)
    rest = without_prefix(flops, *_cached_modules(model, model_name, prefix, batch_size, image_size))
    return (flops["total"] - rest["total"]) / flops["total"] if flops["total"] else 0.0


def _cached_modules(model: nn.Module, model_name: str, prefix: list[str], batch_size: int,
                    image_size: int) -> tuple[list[str], dict[str, int]]:
    """The prefix's modules as :func:`~freezetune.measure.flops.without_prefix` takes them.

    A whole stage is its top-level modules, whose FLOPs the step count has already; only a block
    point needs its own count (one meta forward), so a prefix of whole stages costs no extra count.
    """
    order = stages(model_name)
    modules = [m for point in prefix for m in (order[point] if point in order else prefix_modules(model_name, [point]))]
    return modules, submodule_forward_flops(model, batch_size, image_size, modules)
