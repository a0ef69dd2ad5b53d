"""Every ``requires_grad`` decision lives here.

A freeze spec selects modules by fnmatch patterns over the dotted names from ``named_modules()``;
a selected module covers everything inside it. The result is a :class:`FreezePlan` that the rest of
freezetune reads: which parameters train, which BatchNorm layers are frozen, and how to put the
model in training mode without letting frozen BatchNorm statistics drift.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from freezetune.config import FreezeConfig, ModelConfig
from freezetune.errors import FreezeError
from freezetune.model import build_model, stages


@dataclass
class FreezePlan:
    """The outcome of applying a freeze spec to a model.

    Attributes:
        trainable: Names of parameters with ``requires_grad=True``.
        frozen: Names of parameters with ``requires_grad=False``.
        frozen_bn: Names of BatchNorm modules kept in eval mode (``batchnorm: frozen``).
        batchnorm: The BatchNorm policy, ``frozen`` or ``train``.
    """

    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    frozen_bn: list[str] = field(default_factory=list)
    batchnorm: str = "frozen"


def module_names(model: nn.Module) -> list[str]:
    """Returns the dotted names patterns can match (the root module's empty name excluded)."""
    return [name for name, _ in model.named_modules() if name]


def match_modules(model: nn.Module, patterns: list[str]) -> set[str]:
    """Returns the names of modules selected by the patterns, including everything inside them.

    Raises:
        FreezeError: If a pattern matches no module; the message lists the valid names.
    """
    names = module_names(model)
    selected: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            top = [n for n in names if "." not in n]
            raise FreezeError(
                f"freeze pattern {pattern!r} matches no module; top-level modules are "
                f"{', '.join(top)} (nested names look like layer4.0.conv1)"
            )
        selected.update(hits)
    # A selected module covers its children: layer4 selects layer4.0.conv1 too.
    return {n for n in names if any(n == s or n.startswith(s + ".") for s in selected)}


def frozen_modules(model: nn.Module, spec: FreezeConfig, model_name: str) -> set[str]:
    """Resolves a spec to the set of frozen module names (empty: everything trains)."""
    names = set(module_names(model))
    if spec.trainable is not None:
        trainable = match_modules(model, spec.trainable)
        # Ancestors of a trainable module are containers, not frozen as a whole.
        return {n for n in names if n not in trainable and not _has_descendant(n, trainable)}
    if spec.frozen is not None:
        return match_modules(model, spec.frozen)
    if spec.until is not None:
        return match_modules(model, list(modules_until(model_name, spec.until)))
    return set()


def modules_until(model_name: str, stage: str) -> tuple[str, ...]:
    """Returns the top-level modules from the input up to and including ``stage``.

    Raises:
        FreezeError: If ``stage`` is not a freeze point of the model.
    """
    order = stages(model_name)
    if stage not in order or stage == "head":
        valid = ", ".join(s for s in order if s != "head")
        raise FreezeError(f"freeze.until: {stage!r} is not a freeze point of {model_name}; use one of {valid}")
    out: list[str] = []
    for name, mods in order.items():
        out.extend(mods)
        if name == stage:
            return tuple(out)
    raise AssertionError("unreachable")


def apply_freeze(model: nn.Module, spec: FreezeConfig, model_name: str) -> FreezePlan:
    """Sets ``requires_grad`` on every parameter according to the spec.

    Args:
        model: The model to freeze in place.
        spec: The ``freeze`` config section.
        model_name: torchvision name, for ``until`` freeze points.

    Returns:
        The FreezePlan describing the result.

    Raises:
        FreezeError: On a pattern that matches nothing, or when nothing is left to train.
    """
    frozen_mods = frozen_modules(model, spec, model_name)
    plan = FreezePlan(batchnorm=spec.batchnorm)
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        is_frozen = owner in frozen_mods
        param.requires_grad_(not is_frozen)
        (plan.frozen if is_frozen else plan.trainable).append(name)
    if not plan.trainable:
        raise FreezeError("the freeze spec freezes every parameter: nothing to train")
    if spec.batchnorm == "frozen":
        plan.frozen_bn = [
            name
            for name, mod in model.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and all(not p.requires_grad for p in mod.parameters(recurse=False))
        ]
    set_train_mode(model, plan, True)
    return plan


def unfreeze_all(model: nn.Module) -> FreezePlan:
    """Makes every parameter trainable (the ``full`` arm of a comparison)."""
    return apply_freeze(model, FreezeConfig(), "")


def preview(model_cfg: ModelConfig, spec: FreezeConfig) -> tuple[nn.Module, FreezePlan]:
    """Applies a freeze spec to a randomly initialised model of the configured shape.

    The split into trainable and frozen parameters does not depend on weight values, so this
    checks patterns and counts parameters without loading (or downloading) any weights.
    """
    model = build_model(model_cfg.model_copy(update={"weights": "none"})).model
    return model, apply_freeze(model, spec, model_cfg.name)


def set_train_mode(model: nn.Module, plan: FreezePlan, mode: bool = True) -> None:
    """Puts the model in train or eval mode, keeping frozen BatchNorm in eval mode.

    ``model.train()`` alone would let frozen BatchNorm layers update their running statistics
    (and normalise with batch statistics), so "frozen" layers would still change. Call this
    instead of ``model.train()`` whenever training resumes, e.g. after a validation pass.
    """
    model.train(mode)
    if mode:
        modules = dict(model.named_modules())
        for name in plan.frozen_bn:
            modules[name].eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Returns the parameters the optimizer may hold: exactly those with requires_grad."""
    return [p for p in model.parameters() if p.requires_grad]


def frozen_state(model: nn.Module, plan: FreezePlan) -> dict[str, torch.Tensor]:
    """Returns the tensors that must not change: frozen parameters and frozen BatchNorm buffers."""
    params = dict(model.named_parameters())
    state = {name: params[name] for name in plan.frozen}
    modules = dict(model.named_modules())
    for bn_name in plan.frozen_bn:
        for buf_name, buf in modules[bn_name].named_buffers(recurse=False):
            state[f"{bn_name}.{buf_name}"] = buf
    return state


def fingerprint(model: nn.Module, plan: FreezePlan) -> dict[str, str]:
    """Returns a sha256 per frozen tensor, to prove later that nothing frozen moved."""
    return {name: tensor_sha256(t) for name, t in frozen_state(model, plan).items()}


def tensor_sha256(t: torch.Tensor) -> str:
    """Hashes a tensor's exact bytes (any dtype, any device)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def combined_sha256(hashes: dict[str, str]) -> str:
    """Folds per-tensor hashes (with their names) into one digest."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}={hashes[name]}\n".encode())
    return h.hexdigest()


def _has_descendant(name: str, selected: set[str]) -> bool:
    prefix = name + "."
    return any(s.startswith(prefix) for s in selected)
