"""Proof that frozen means frozen: sha256 fingerprints of frozen tensors, and frozen-BN drift.

The one copy of these checks: training fingerprints the frozen tensors at the start and compares
them at the end (and when a schedule unfreezes them), and comparisons use the same functions to
show what a plain ``requires_grad=False`` loop does to BatchNorm statistics.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from freezetune.freezing.plan import FreezePlan


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


def changed_tensors(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The tensors of ``after`` (those frozen now) whose hash differs from ``before``'s, sorted.

    Only tensors still frozen are compared: one that an unfreeze phase made trainable was checked
    when it was unfrozen, and may change from then on. A tensor missing from ``before`` counts as
    changed.
    """
    return sorted(k for k, h in after.items() if before.get(k) != h)


def frozen_layer_batchnorm_state(model: nn.Module) -> dict[str, str]:
    """sha256 of the running statistics of every BatchNorm whose own parameters are all frozen.

    Under ``batchnorm: frozen`` these never change; a plain loop (BatchNorm in train mode) keeps
    updating them even though ``requires_grad`` is False, which changes what the frozen layers compute.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            for buf in ("running_mean", "running_var"):
                t = getattr(m, buf, None)
                if t is not None:
                    out[f"{name}.{buf}"] = tensor_sha256(t)
    return out


def batchnorm_drift(before: dict[str, str], after: dict[str, str]) -> dict:
    """How many frozen layers' BatchNorm statistics changed between two :func:`frozen_layer_batchnorm_state`."""
    changed = sorted({k.rsplit(".", 1)[0] for k, h in before.items() if after.get(k) != h})
    return {"layers_checked": len({k.rsplit(".", 1)[0] for k in before}), "layers_changed": len(changed),
            "changed": changed[:5]}
