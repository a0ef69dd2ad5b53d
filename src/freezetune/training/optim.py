"""The optimizer: SGD over trainable parameters only, in named groups, with a step-based LR schedule.

The learning rate of every group is ``optim.lr * group lr_mult * schedule(step)``, a pure function
of the global step. Nothing about the schedule lives in a stateful scheduler object, so a resumed
run (or a group added mid-run by gradual unfreezing) gets exactly the rate an uninterrupted run
would have had.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from freezetune.config import OptimConfig


def param_matches(name: str, patterns: str | list[str]) -> bool:
    """Whether a parameter name matches a pattern (fnmatch, or a module prefix like ``layer4``)."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def group_params(
    named: list[tuple[str, nn.Parameter]], cfg: OptimConfig, lr_mult: float = 1.0, label: str = "base"
) -> list[dict]:
    """Splits trainable parameters into optimizer groups by ``optim.param_groups`` (first match wins).

    Args:
        named: (name, parameter) pairs; frozen ones are refused.
        cfg: The ``optim`` config section.
        lr_mult: Extra multiplier for every group (an unfreeze phase's ``lr_mult``).
        label: Prefix of the group names, e.g. ``base`` or ``unfreeze@2``.

    Returns:
        Param-group dicts for ``torch.optim.SGD`` (empty groups left out).
    """
    buckets: list[list[nn.Parameter]] = [[] for _ in range(len(cfg.param_groups) + 1)]
    for name, p in named:
        if not p.requires_grad:
            raise ValueError(f"frozen parameter {name} offered to the optimizer")
        index = next((i for i, r in enumerate(cfg.param_groups) if param_matches(name, r.match)), -1)
        buckets[index].append(p)
    groups = []
    for i, params in enumerate(buckets):
        if not params:
            continue
        rule = cfg.param_groups[i] if i < len(cfg.param_groups) else None
        mult = lr_mult * (rule.lr_mult if rule else 1.0)
        wd = rule.weight_decay if rule and rule.weight_decay is not None else cfg.weight_decay
        name = f"{label}/{_rule_name(rule)}" if rule else label
        groups.append({"params": params, "lr": cfg.lr * mult, "lr_mult": mult, "weight_decay": wd, "name": name})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum over the model's trainable parameters, grouped by ``optim.param_groups``.

    The fused kernel is used where this torch has one for the parameters' device: it updates each
    parameter in one pass over weight, gradient and momentum instead of three, which on a CPU is a
    measurable part of a step whose trainable part is small (see :func:`sgd`).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return sgd(group_params(named, cfg), cfg)


def sgd(params, cfg: OptimConfig, fused: bool = True) -> torch.optim.SGD:
    """``torch.optim.SGD`` with the config's hyperparameters, fused where supported.

    Args:
        params: Parameters or param-group dicts.
        cfg: The ``optim`` config section.
        fused: Try the fused kernel; torch's default implementation when False or unsupported.
    """
    kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "nesterov": cfg.nesterov}
    params = list(params)
    if fused:
        try:
            return torch.optim.SGD(params, **kwargs, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused SGD kernel for this device or torch version
    return torch.optim.SGD(params, **kwargs)


def plain_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """The naive baseline: *every* parameter handed to torch's default SGD, frozen ones included.

    This is what a plain ``requires_grad=False`` loop does (``SGD(model.parameters(), ...)``). It is
    correct, since SGD skips parameters without a gradient, but it is not what freezetune trains
    with; only the comparison's ``plain`` arms use it, to measure what freezetune's path gains.
    """
    return sgd(model.parameters(), cfg, fused=False)


def add_unfrozen(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]], cfg: OptimConfig,
    lr_mult: float, label: str,
) -> list[str]:
    """Adds newly trainable parameters as new groups; returns the new groups' names."""
    added = []
    for group in group_params(named, cfg, lr_mult, label):
        optimizer.add_param_group(group)
        added.append(group["name"])
    return added


def remove_frozen(optimizer: torch.optim.Optimizer) -> None:
    """Takes parameters that stopped requiring grad out of the optimizer and frees their state.

    Groups left empty are dropped. A resumed run replays the same removals before loading the
    optimizer's state dict, so the group layout matches the one that was saved. What is freed is
    :func:`state_bytes` of those parameters, measured before the call.
    """
    for group in list(optimizer.param_groups):
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if p.requires_grad]
        if not group["params"]:
            optimizer.param_groups.remove(group)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The schedule's multiplier for the step about to run (0-based), warm-up included."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_mult + (1 - cfg.min_lr_mult) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.scheduler == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Sets every group's lr for this step; returns the schedule factor."""
    factor = lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_mult", 1.0) * factor
    return factor


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by optimizer state tensors (SGD momentum buffers)."""
    return sum(_tensor_bytes(state) for state in optimizer.state.values())


def state_bytes(optimizer: torch.optim.Optimizer, model: nn.Module, names) -> int:
    """Bytes of optimizer state held for the named parameters (names that are not parameters are skipped)."""
    params = dict(model.named_parameters())
    return sum(_tensor_bytes(optimizer.state.get(params[n], {})) for n in names if n in params)


def _tensor_bytes(state: dict) -> int:
    """Bytes of the tensors in one parameter's optimizer state."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Asserts that no frozen parameter is in any param group or holds optimizer state."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                name = names.get(id(p), "?")
                raise AssertionError(f"frozen parameter {name} is in optimizer group {group.get('name')}")
    for p in optimizer.state:
        if not p.requires_grad:
            raise AssertionError(f"frozen parameter {names.get(id(p), '?')} holds optimizer state")


def _rule_name(rule) -> str:
    return rule.match if isinstance(rule.match, str) else ",".join(rule.match)
