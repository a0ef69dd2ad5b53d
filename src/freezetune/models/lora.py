"""Low-rank adapters on convolutions, made by Hugging Face peft: the one module with peft code.

``adapt.method: lora`` keeps every pretrained weight frozen and trains, beside each chosen
convolution, a rank-``r`` update ``B @ A`` scaled by ``alpha / r`` (Hu et al. 2022). The layers are
peft's own (``inject_adapter_in_model``), injected in place, so the model keeps its module names
(``layer3.0.conv1`` becomes a peft ``Conv2d`` holding ``base_layer``, ``lora_A`` and ``lora_B``)
and everything that reads stages by name still works. A run's adapter can be written in peft's
format (:func:`save_peft_adapter`), which ``peft.PeftModel.from_pretrained`` loads elsewhere, or
merged into the weights (:func:`merge_lora`) for a plain model and ONNX.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import torch
from torch import nn

from freezetune.config import LoraSpec
from freezetune.errors import FreezeError, MissingExtraError

ADAPTER = "default"  # peft's adapter name: one adapter per run


def require_peft(what: str = "adapt.method: lora"):
    """Imports peft, or says how to install it in one line.

    Raises:
        MissingExtraError: If peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise MissingExtraError.of(what, "peft", "peft") from None
    return peft


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter's (``...lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def has_lora(model: nn.Module) -> bool:
    """Whether adapters are already injected into the model."""
    return any(is_lora_parameter(n) for n, _ in model.named_parameters())


def lora_targets(model: nn.Module, spec: LoraSpec, frozen: set[str], head: set[str]) -> list[str]:
    """The convolutions that get adapters, by name.

    Args:
        model: The model, before injection.
        spec: The ``adapt.lora`` section (``target`` patterns, or None for the default).
        frozen: Parameter names the freeze selectors froze: their stages get no adapters.
        head: Parameter names of the head, which trains whole and gets none.

    Raises:
        FreezeError: If a pattern matches no convolution, names one in a frozen stage, or nothing is left.
    """
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    open_ = [n for n in convs if f"{n}.weight" not in frozen and f"{n}.weight" not in head]
    if spec.target is None:
        chosen = open_
    else:
        chosen = []
        for pattern in spec.target:
            hits = [n for n in convs if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise FreezeError(f"adapt.lora.target {pattern!r} matches no convolution (they are named like "
                                  f"{convs[-1] if convs else 'none here'})")
            closed = [n for n in hits if n not in open_]
            if closed:
                raise FreezeError(f"adapt.lora.target {pattern!r} matches {closed[0]}, which the freeze "
                                  "selectors keep frozen; adapters go on trainable stages only")
            chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise FreezeError("adapt.method: lora has no convolution to adapt outside the head and the frozen "
                          "layers; freeze less")
    return [n for n in convs if n in chosen]  # model order


def peft_config(spec: LoraSpec, targets: list[str], modules_to_save: list[str] | None = None):
    """The ``peft.LoraConfig`` for these convolutions (exact names: a regex peft matches whole)."""
    peft = require_peft()
    return peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules="^(?:" + "|".join(re.escape(t) for t in targets) + ")$",
                           modules_to_save=modules_to_save, bias="none")


def inject_lora(model: nn.Module, spec: LoraSpec, targets: list[str]) -> None:
    """Puts peft's LoRA layers beside ``targets``, in place (``lora_B`` starts at zero: the model is unchanged).

    ``lora_A`` is initialised from the global torch RNG, so a seeded run injects the same adapters.
    """
    peft = require_peft()
    peft.inject_adapter_in_model(peft_config(spec, targets), model, adapter_name=ADAPTER)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The injected LoRA layers by name."""
    require_peft()
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its convolution's weight and puts the plain convolution back, in place.

    The result has the model's original module and parameter names, so it loads as ``model.weights``
    anywhere, with or without peft.
    """
    modules = dict(model.named_modules())
    for name, layer in lora_layers(model).items():
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # left by the injection; peft would read it as adapters still there
        del model.peft_config
    return model


def save_peft_adapter(trained: nn.Module, base: nn.Module, spec: LoraSpec, head: list[str], out: Path) -> int:
    """Writes the adapter in peft's own format: ``adapter_model.safetensors`` and ``adapter_config.json``.

    peft writes it (``PeftModel.save_pretrained``) from a ``PeftModel`` made on ``base`` with the
    same adapters, the head as ``modules_to_save``, and the trained values copied in, so
    ``PeftModel.from_pretrained(<the base model>, out)`` gives the trained model back.

    Args:
        trained: The trained model, adapters injected.
        base: A model with the run's base weights and head shape, no adapters (consumed).
        spec: The run's ``adapt.lora``.
        head: The head's module names (``fc``), which trained whole.
        out: The folder to write.

    Returns:
        How many tensors the adapter holds.
    """
    peft = require_peft()
    targets = list(lora_layers(trained))
    wrapped = peft.get_peft_model(base, peft_config(spec, targets, modules_to_save=head), adapter_name=ADAPTER)
    params = dict(wrapped.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, t in trained.named_parameters():
            if is_lora_parameter(name):
                key = f"base_model.model.{name}"
            elif any(name == h or name.startswith(h + ".") for h in head):
                owner, _, leaf = name.rpartition(".")
                key = f"base_model.model.{owner}.modules_to_save.{ADAPTER}.{leaf}"
            else:
                continue
            params[key].copy_(t.detach().to(params[key].device, params[key].dtype))
            copied += 1
    wrapped.save_pretrained(str(out), safe_serialization=True)
    return copied
