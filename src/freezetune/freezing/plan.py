"""Every ``requires_grad`` decision lives here.

A freeze spec selects modules by fnmatch patterns over the dotted names from ``named_modules()``;
a selected module covers everything inside it. Patterns can also name *loose* parameters, those
held directly by a module that has submodules (ViT's ``class_token`` on the model itself,
``encoder.pos_embedding``): selecting their module would select all its children too. The
result is a :class:`FreezePlan` that the rest of freezetune reads: which parameters train, which
BatchNorm layers are frozen, and how to put the model in training mode without letting frozen
BatchNorm statistics drift.

``adapt.method`` narrows what trains further, to a sliver spread through the whole network: the
BatchNorm affine parameters (``bn``), the biases (``bias``) or low-rank adapters injected beside the
convolutions (``lora``), plus the head. It is the same
``requires_grad`` mask, so the integrity check, the optimizer check, the trainable-only checkpoint
and the FLOP count need nothing of their own for it. A BatchNorm layer with a trainable parameter
is in training mode, as in any stage that trains, so a ``bn`` arm also updates the running
statistics: the method (Frankle et al.) trains BatchNorm, statistics included.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field

from torch import nn

from freezetune.config import AdaptConfig, FreezeConfig, ModelConfig
from freezetune.errors import FreezeError
from freezetune.models.catalog import block_points, meta_model, replace_head, stages
from freezetune.models.lora import has_lora, inject_lora, is_lora_parameter, lora_targets


@dataclass
class FreezePlan:
    """The outcome of applying a freeze spec to a model.

    Attributes:
        trainable: Names of parameters with ``requires_grad=True``.
        frozen: Names of parameters with ``requires_grad=False``.
        frozen_bn: Names of BatchNorm modules kept in eval mode (``batchnorm: frozen``).
        batchnorm: The BatchNorm policy, ``frozen`` or ``train``.
        adapt: The ``adapt.method`` that narrowed what trains (``none``, ``bn``, ``bias`` or ``lora``).
    """

    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    frozen_bn: list[str] = field(default_factory=list)
    batchnorm: str = "frozen"
    adapt: str = "none"


def module_names(model: nn.Module) -> list[str]:
    """Returns the dotted names patterns can match (the root module's empty name excluded)."""
    return [name for name, _ in model.named_modules() if name]


def loose_parameters(model: nn.Module) -> list[str]:
    """Names of parameters held directly by a module that also has submodules (e.g. ``class_token``)."""
    return [
        f"{owner}.{name}" if owner else name
        for owner, mod in model.named_modules()
        if next(mod.children(), None) is not None
        for name, _ in mod.named_parameters(recurse=False)
    ]


def match_modules(model: nn.Module, patterns: list[str]) -> set[str]:
    """Returns the names of modules selected by the patterns, including everything inside them.

    Raises:
        FreezeError: If a pattern matches no module (nor loose parameter); the message lists the
            valid names.
    """
    modules = set(module_names(model))
    return {n for n in _select(model, patterns) if n in modules}


def match_parameters(model: nn.Module, patterns: list[str]) -> set[str]:
    """Returns the names of the parameters the patterns select.

    Those are the parameters inside every selected module, plus loose parameters the patterns
    name directly (``class_token``).

    Raises:
        FreezeError: If a pattern matches no module nor loose parameter.
    """
    selected = _select(model, patterns)
    return {n for n, _ in model.named_parameters() if n in selected or _owner(n) in selected}


def _select(model: nn.Module, patterns: list[str]) -> set[str]:
    """Module and loose-parameter names matched by the patterns, with everything inside them."""
    names = module_names(model) + loose_parameters(model)
    selected: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise FreezeError(f"freeze pattern {pattern!r} matches no module; {_valid_names(model)}")
        selected.update(hits)
    # A selected module covers its children: layer4 selects layer4.0.conv1 too.
    return {n for n in names if any(n == s or n.startswith(s + ".") for s in selected)}


def _valid_names(model: nn.Module) -> str:
    names = module_names(model)
    top = [n for n in names if "." not in n]
    nested = [n for n in names if n.count(".") == 2]
    text = f"top-level modules are {', '.join(top)}"
    if nested:
        last_top = nested[-1].split(".")[0]
        example = next(n for n in nested if n.startswith(last_top + "."))
        text += f" (nested names look like {example})"
    loose = loose_parameters(model)
    return text + (f"; loose parameters: {', '.join(loose)}" if loose else "")


def frozen_modules(model: nn.Module, spec: FreezeConfig, model_name: str) -> set[str]:
    """Resolves a spec to the set of frozen module names (empty: everything trains).

    Loose parameters (see :func:`loose_parameters`) are not modules: :func:`frozen_parameters`
    is the complete answer, and what :func:`apply_freeze` uses.
    """
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


def frozen_parameters(model: nn.Module, spec: FreezeConfig, model_name: str) -> set[str]:
    """Resolves a spec to the names of the parameters it freezes (empty: everything trains)."""
    if spec.trainable is not None:
        keep = match_parameters(model, spec.trainable)
        return {n for n, _ in model.named_parameters() if n not in keep}
    if spec.frozen is not None:
        return match_parameters(model, spec.frozen)
    if spec.until is not None:
        return match_parameters(model, list(modules_until(model_name, spec.until)))
    return set()


def modules_until(model_name: str, point: str) -> tuple[str, ...]:
    """Returns the members of the freeze points from the input up to and including ``point``.

    ``point`` is a stage (``layer3``) or, for a ResNet, a block point (``layer3.0``: the stages
    before ``layer3`` and its first block). Members are module names and, for ViT, loose parameter
    names (``class_token``); see :func:`freezetune.models.catalog.stages` and
    :func:`~freezetune.models.catalog.block_points` for each model's freeze points.

    Raises:
        FreezeError: If ``point`` is not a freeze point of the model.
    """
    order = stages(model_name)
    if point in order and point != "head":
        return _members_through(order, point)
    fine = block_points(model_name)
    if point in fine and point != "head":
        return _members_through(fine, point)
    points = [s for s in order if s != "head"]
    close = difflib.get_close_matches(point, [*points, *fine], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    blocks = [p for p in fine if p not in order]
    also = f", or a block: {blocks[0]} .. {blocks[-1]}" if blocks else ""
    raise FreezeError(
        f"freeze.until: {point!r} is not a freeze point of {model_name}; "
        f"{hint}use one of {', '.join(points)}{also}"
    )


def _members_through(order: dict[str, tuple[str, ...]], point: str) -> tuple[str, ...]:
    out: list[str] = []
    for name, mods in order.items():
        out.extend(mods)
        if name == point:
            break
    return tuple(out)


ADAPT_METHODS = {"bn": "BatchNorm affine parameters", "bias": "biases", "lora": "low-rank adapters"}


def adapted_parameters(model: nn.Module, method: str) -> set[str]:
    """The parameters an ``adapt.method`` trains besides the head (empty for ``none``).

    ``bn``: the weight and bias of every BatchNorm layer. ``bias``: every parameter named ``bias``
    (in a torchvision ResNet, whose convolutions have none, that is BatchNorm's beta). ``lora``:
    the injected adapters' ``lora_A`` and ``lora_B``.
    """
    if method == "bn":
        return {f"{owner}.{name}" for owner, mod in model.named_modules()
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) for name, _ in mod.named_parameters(recurse=False)}
    if method == "bias":
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if method == "lora":
        return {n for n, _ in model.named_parameters() if is_lora_parameter(n)}
    return set()


def adapt_frozen(model: nn.Module, adapt: AdaptConfig | None, model_name: str, frozen: set[str]) -> set[str]:
    """The parameters ``adapt`` freezes on top of ``frozen`` (the spec's): all but its sliver and the head.

    With ``lora``, first puts the adapters beside the convolutions ``adapt.lora`` targets (in place;
    a model that has them already keeps them).

    Raises:
        FreezeError: If the method finds nothing of its kind outside the frozen layers.
        MissingExtraError: For ``lora`` without peft.
    """
    method = "none" if adapt is None else adapt.method
    if method == "none":
        return set()
    head = match_parameters(model, list(stages(model_name)["head"]))
    if method == "lora" and not has_lora(model):
        # The stages the spec froze get no adapters, so their parameter names stay as they were.
        inject_lora(model, adapt.lora, lora_targets(model, adapt.lora, frozen, head))
    sliver = adapted_parameters(model, method) - frozen - head
    if not sliver:
        where = "outside the head and the frozen layers" if frozen else "outside the head"
        raise FreezeError(f"adapt.method: {method} trains {ADAPT_METHODS[method]}, and {model_name} has none "
                          f"{where}; use another method or freeze less")
    return {n for n, _ in model.named_parameters() if n not in sliver | head}


def apply_freeze(model: nn.Module, spec: FreezeConfig, model_name: str,
                 adapt: AdaptConfig | None = None) -> FreezePlan:
    """Sets ``requires_grad`` on every parameter according to the spec and the adapt method.

    With ``adapt.method: lora`` the model changes first: peft's adapters are injected beside the
    targeted convolutions (see :mod:`freezetune.models.lora`), whose weights are then named
    ``<conv>.base_layer.weight``. Build the model and load its weights before calling this.

    Args:
        model: The model to freeze in place.
        spec: The ``freeze`` config section.
        model_name: torchvision name, for ``until`` freeze points.
        adapt: The ``adapt`` config section (None: ``method: none``).

    Returns:
        The FreezePlan describing the result.

    Raises:
        FreezeError: On a pattern that matches nothing, an adapt method with nothing to train, or
            when nothing is left to train.
    """
    frozen = frozen_parameters(model, spec, model_name)
    frozen |= adapt_frozen(model, adapt, model_name, frozen)
    plan = FreezePlan(batchnorm=spec.batchnorm, adapt="none" if adapt is None else adapt.method)
    for name, param in model.named_parameters():
        is_frozen = name in frozen
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


def preview(model_cfg: ModelConfig, spec: FreezeConfig,
            adapt: AdaptConfig | None = None) -> tuple[nn.Module, FreezePlan]:
    """Applies a freeze spec to a model of the configured shape, built on the meta device.

    The split into trainable and frozen parameters does not depend on weight values, so this
    checks patterns and counts parameters without loading (or downloading) any weights. The
    model is built on the meta device: its shapes without memory or initialisation (count its
    parameters and FLOPs; it cannot run on data).
    """
    model = meta_model(model_cfg.name)
    replace_head(model, model_cfg.num_classes)
    return model, apply_freeze(model, spec, model_cfg.name, adapt)


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


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _has_descendant(name: str, selected: set[str]) -> bool:
    prefix = name + "."
    return any(s.startswith(prefix) for s in selected)


def unfreeze(model: nn.Module, plan: FreezePlan, patterns: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Makes the modules matching ``patterns`` trainable (a gradual-unfreezing phase), in place.

    BatchNorm layers that become trainable leave ``plan.frozen_bn``, so :func:`set_train_mode` puts
    them in train mode from now on; BatchNorm layers elsewhere stay frozen.

    Returns:
        The (name, parameter) pairs that were frozen and now train, in model order.

    Raises:
        FreezeError: If a pattern matches no module.
    """
    selected = match_modules(model, patterns)
    chosen = match_parameters(model, patterns)  # also loose parameters such as ViT's class_token
    newly = []
    for name, param in model.named_parameters():
        if name in chosen and not param.requires_grad:
            param.requires_grad_(True)
            newly.append((name, param))
    moved = {n for n, _ in newly}
    plan.trainable = [n for n, _ in model.named_parameters() if n in moved or n in set(plan.trainable)]
    plan.frozen = [n for n in plan.frozen if n not in moved]
    plan.frozen_bn = [n for n in plan.frozen_bn if n not in selected]
    return newly
