"""The torchvision classification models freezetune builds, and their freeze points.

A freeze point (stage) is a name from the model's own architecture (``layer3`` for a ResNet,
``stage2`` for MobileNetV3, ``encoder_layer_5`` for a ViT) standing for the modules it covers, and
for ViT also the loose parameters (``class_token``, ``encoder.pos_embedding``) that no module owns
alone. Stages are in forward order and end with ``head``; ``freeze.until: STAGE`` freezes that
stage and every one before it.

The ResNets' stages are a fixed table. Every other family's stages are read off the model's own
structure (built on the meta device: no memory, no initialisation cost), so each variant of a
family (``efficientnet_b0`` or ``_v2_l``, ``vit_b_16`` or ``vit_h_14``) gets exactly its own
blocks. Families without a curated rule fall back to their top-level modules, in forward order.

``timm/<name>`` (the optional ``timm`` extra) names a timm model. Its freeze points come from timm's
own stage grouping (``model.group_matcher(coarse=True)``, else ``model.feature_info``), read off a
model built on the meta device, and its head is ``model.get_classifier()``. timm is imported only
inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from freezetune.errors import ConfigError

DEFAULT_MODEL = "resnet18"

# Freeze points in forward order: each stage lists the top-level modules it covers.
RESNET_STAGES: dict[str, tuple[str, ...]] = {
    "stem": ("conv1", "bn1", "relu", "maxpool"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "head": ("avgpool", "fc"),
}

# How each family's freeze points are named, for `freezetune models` and the docs.
FAMILY_RULES: dict[str, str] = {
    "resnet": "stem (conv1 bn1 relu maxpool), layer1..layer4, head (avgpool fc)",
    "mobilenet_v3": "stem (features.0), stageN: blocks grouped at each resolution change, "
    "last_conv (last features.K), head (avgpool classifier)",
    "mobilenet_v2": "stem (features.0), stageN: blocks grouped at each resolution change, "
    "last_conv (last features.K), head (classifier)",
    "efficientnet": "stem (features.0), stageN (features.N, the paper's stages), "
    "last_conv (last features.K), head (avgpool classifier)",
    "convnext": "stem (features.0), stage1 (features.1), stageN (downsample features.2N-2 + "
    "blocks features.2N-1), head (avgpool classifier)",
    "swin": "patch_embed (features.0), stage1 (features.1), stageN (patch merging "
    "features.2N-2 + blocks features.2N-1), head (norm avgpool head)",
    "vit": "embed (conv_proj class_token encoder.pos_embedding), encoder_layer_0.., "
    "encoder_ln (encoder.ln), head (heads)",
    "regnet": "stem, block1..block4 (trunk_output.blockN), head (avgpool fc)",
}
TIMM_PREFIX = "timm/"
TIMM_INSTALL_HINT = "pip install 'freezetune[timm]'"
TIMM_RULE = (
    "timm's own stage grouping (group_matcher(coarse=True), else feature_info): stem, then one "
    "freeze point per stage named after its module (layer1, stages_0, blocks_3), head: "
    "get_classifier() and the layers after the last stage"
)
GENERIC_RULE = (
    "the model's own module names in forward order (a norm or parameter-free layer joins the "
    "stage before it), head: the classifier"
)

# Builder arguments freezetune needs: training uses the main output only, and the auxiliary
# classifiers would make a train-mode forward return a tuple.
_BUILD_KWARGS: dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# Keys of torchvision's ImageNet checkpoints for the auxiliary classifiers left out above.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
# Models built for one input size (position embeddings, window partitions), and models whose
# downsampling fails below a minimum size. Sizes from torchvision's weights metadata.
_EXACT_SIZE = {"vit": 224, "maxvit": 224}
_MIN_SIZE = {"alexnet": 63, "inception": 75}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@functools.cache
def model_names() -> tuple[str, ...]:
    """All torchvision classification model names, sorted (``torchvision.models`` only)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def check_model_name(name: str) -> None:
    """Raises ConfigError, with close matches, if ``name`` is not a classification model.

    ``timm/<name>`` is checked against timm's registry (``timm.is_model``); without timm installed
    the error says how to install it.
    """
    if is_timm_name(name):
        _check_timm_name(name)
        return
    if name in model_names():
        return
    if name in torchvision.models.list_models():
        why = "is a torchvision detection/segmentation/video/quantized model; freezetune fine-tunes classifiers"
        raise ConfigError(f"{name!r} {why}")
    close = difflib.get_close_matches(name, model_names(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ConfigError(
        f"unknown model {name!r}; {hint}`freezetune models` lists the {len(model_names())} "
        "torchvision classification models"
    )


def family(name: str) -> str:
    """The architecture family of a model name, e.g. ``resnet`` for ``resnext50_32x4d``; ``timm`` for timm models."""
    if is_timm_name(name):
        return "timm"
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "resnet"
    for prefix in ("mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext", "swin", "vit", "regnet"):
        if name.startswith(prefix):
            return prefix
    match = re.match(r"[a-z]+", name)
    return match.group(0) if match else name


def is_resnet(name: str) -> bool:
    """Whether the model is a torchvision ResNet (ResNet, ResNeXt, Wide ResNet)."""
    return family(name) == "resnet"


def build(name: str) -> nn.Module:
    """Builds a randomly initialised model with freezetune's builder arguments.

    Raises:
        ConfigError: If ``name`` is not a torchvision classification model.
    """
    check_model_name(name)
    if is_timm_name(name):
        return import_timm().create_model(timm_arch(name), pretrained=False)
    return torchvision.models.get_model(name, weights=None, **_BUILD_KWARGS.get(name, {}))


def meta_model(name: str) -> nn.Module:
    """The model with every tensor on the meta device: its structure, with no memory or init cost."""
    if is_timm_name(name):
        check_model_name(name)
        try:
            with torch.device("meta"):
                return build(name)
        except Exception:  # noqa: BLE001 - a builder computing with tensor values; the patch below copes
            pass
    with _parameters_on_meta():
        model = build(name)
    return model.to("meta")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    # Not thread-safe (it patches nn.Module for the duration); build from one thread.
    # Not `with torch.device("meta")`: RegNet's builder computes its widths with tensors and
    # needs their values. Moving each parameter as it is registered keeps builders working, and
    # the initialisers that run afterwards touch only meta tensors.
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def stages(name: str) -> dict[str, tuple[str, ...]]:
    """Returns the ordered freeze points of a model: stage name -> the modules it covers.

    Members are dotted module names (``features.3``) or, for parameters held directly by a
    container (ViT's ``class_token``), parameter names. The last stage is always ``head``.

    Raises:
        ConfigError: If ``name`` is not a torchvision classification model.
    """
    return dict(_stages(name))


@functools.cache
def _stages(name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if is_resnet(name):
        check_model_name(name)
        return tuple(RESNET_STAGES.items())
    return tuple(derive_stages(name, meta_model(name)).items())


def derive_stages(name: str, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Reads the freeze points of a (meta or real) model of this name off its structure."""
    if is_timm_name(name):
        return timm_stages(model)
    rule = {
        "resnet": lambda m: dict(RESNET_STAGES),
        "mobilenet_v2": _mobilenet,
        "mobilenet_v3": _mobilenet,
        "efficientnet": _efficientnet,
        "convnext": lambda m: _downsample_pairs(m, "stem"),
        "swin": lambda m: _downsample_pairs(m, "patch_embed"),
        "vit": _vit,
        "regnet": _regnet,
    }.get(family(name), _generic)
    return rule(model)


def head_path(model: nn.Module) -> str:
    """Dotted name of the classifier layer: the last ``nn.Linear`` (SqueezeNet: last ``Conv2d``).

    For a timm model, the module ``model.get_classifier()`` returns.
    """
    timm_head = _timm_classifier_path(model)
    if timm_head is not None:
        return timm_head
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return (linears or convs)[-1]


def input_size_rule(name: str) -> tuple[int | None, int | None]:
    """``(exact, minimum)`` input size a model needs (None: no constraint)."""
    if is_timm_name(name):
        return _timm_input_rule(name)
    fam = family(name)
    return _EXACT_SIZE.get(fam), _MIN_SIZE.get(fam)


def check_image_size(name: str, height: int, width: int | None = None) -> None:
    """Raises ConfigError if the model cannot take images of this size.

    Usable before building anything (e.g. when validating a config with ``data.image_size``);
    models that need it also check every batch with a forward pre-hook.
    """
    width = height if width is None else width
    exact, minimum = input_size_rule(name)
    if exact is not None and (height, width) != (exact, exact):
        raise ConfigError(
            f"data.image_size: {name} is built for {exact}x{exact} images (got {height}x{width}); "
            f"set data.image_size: {exact}"
        )
    if minimum is not None and min(height, width) < minimum:
        raise ConfigError(
            f"data.image_size: {name} needs images of at least {minimum}x{minimum} "
            f"(got {height}x{width}); raise data.image_size"
        )


def head_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier layer and its dotted name (see :func:`head_path`)."""
    name = head_path(model)
    return name, model.get_submodule(name)


def replace_head(model: nn.Module, num_classes: int) -> bool:
    """Swaps the classifier layer for a fresh one with ``num_classes`` outputs (if it differs).

    Returns:
        Whether the head was replaced.
    """
    name, layer = head_layer(model)
    if _timm_classifier_path(model) is not None and hasattr(model, "reset_classifier"):
        size = getattr(layer, "out_features", getattr(layer, "out_channels", None))
        if size == num_classes:
            return False
        with torch.device(layer.weight.device):
            model.reset_classifier(num_classes)
        model.get_classifier().to(layer.weight.dtype)
        return True
    if isinstance(layer, nn.Conv2d):  # SqueezeNet classifies with a 1x1 convolution
        if layer.out_channels == num_classes:
            return False
        new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, bias=layer.bias is not None)
    else:
        if layer.out_features == num_classes:
            return False
        new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    model.set_submodule(name, new.to(layer.weight.device, layer.weight.dtype))
    return True


def stage_members_cover(param: str, members: tuple[str, ...] | list[str]) -> bool:
    """Whether a parameter name falls under one of a stage's members."""
    return any(param == m or param.startswith(m + ".") for m in members)


# --------------------------------------------------------------------------------------------
# Family rules


def _tail(model: nn.Module, after: str) -> tuple[str, ...]:
    """Top-level modules after ``after``: the head of the features-style models."""
    names = [n for n, _ in model.named_children()]
    return tuple(names[names.index(after) + 1:])


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in module.modules())


def _mobilenet(model: nn.Module) -> dict[str, tuple[str, ...]]:
    # A new stage starts at every block that halves the resolution (torchvision's detection
    # backbones split MobileNets at the same blocks).
    last = len(model.features) - 1
    out: dict[str, tuple[str, ...]] = {"stem": ("features.0",)}
    k = 0
    for i in range(1, last):
        if i == 1 or _downsamples(model.features[i]):
            k += 1
            out[f"stage{k}"] = ()
        out[f"stage{k}"] += (f"features.{i}",)
    out["last_conv"] = (f"features.{last}",)
    out["head"] = _tail(model, "features")
    return out


def _efficientnet(model: nn.Module) -> dict[str, tuple[str, ...]]:
    last = len(model.features) - 1
    out = {"stem": ("features.0",)}
    out.update({f"stage{i}": (f"features.{i}",) for i in range(1, last)})
    out["last_conv"] = (f"features.{last}",)
    out["head"] = _tail(model, "features")
    return out


def _downsample_pairs(model: nn.Module, first: str) -> dict[str, tuple[str, ...]]:
    # features = [stem, blocks, downsample, blocks, ...]: as in the papers and timm, each stage
    # after the first starts with the downsampling layer that produces its resolution.
    out = {first: ("features.0",), "stage1": ("features.1",)}
    for i in range(2, len(model.features), 2):
        out[f"stage{i // 2 + 1}"] = (f"features.{i}", f"features.{i + 1}")
    out["head"] = _tail(model, "features")
    return out


def _vit(model: nn.Module) -> dict[str, tuple[str, ...]]:
    out = {"embed": ("conv_proj", "class_token", "encoder.pos_embedding", "encoder.dropout")}
    for name, _ in model.encoder.layers.named_children():
        out[name] = (f"encoder.layers.{name}",)
    out["encoder_ln"] = ("encoder.ln",)
    out["head"] = ("heads",)
    return out


def _regnet(model: nn.Module) -> dict[str, tuple[str, ...]]:
    out = {"stem": ("stem",)}
    out.update({name: (f"trunk_output.{name}",) for name, _ in model.trunk_output.named_children()})
    out["head"] = _tail(model, "trunk_output")
    return out


def _generic(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Top-level modules in order; a lone container (VGG's ``features``) is split into its layers."""
    head_top = head_path(model).split(".")[0]
    children = list(model.named_children())
    split = [n for n, _ in children].index(head_top)
    body, head = children[:split], [n for n, _ in children[split:]]
    while body and not _has_params(body[-1][1]):  # avgpool, dropout before the classifier
        head.insert(0, body.pop()[0])
    parts = [(n, m) for n, m in body if _has_params(m)]
    if len(parts) < 3:
        body = [sub for name, mod in body for sub in _expand(name, mod)]
    out: dict[str, tuple[str, ...]] = {}
    pending: list[str] = []
    for name, mod in body:
        if out and (not _has_params(mod) or isinstance(mod, _NORMS)):
            last = next(reversed(out))
            out[last] += (name,)
        elif not _has_params(mod):
            pending.append(name)
        else:
            out[name], pending = (*pending, name), []
    out["head"] = tuple(head)
    return out


def _expand(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        kids = list(module.named_children())
        if sum(_has_params(m) for _, m in kids) >= 3:
            return [(f"{name}.{k}", m) for k, m in kids]
    return [(name, module)]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# --------------------------------------------------------------------------------------------
# timm models (``timm/<name>``). Here, not in freezetune.models.timm_models, because the catalog
# (layer 1) needs their stages and heads; building with weights lives in timm_models.


def is_timm_name(name: str) -> bool:
    """Whether ``name`` names a timm model (``timm/<name>``)."""
    return name.startswith(TIMM_PREFIX)


def timm_arch(name: str) -> str:
    """The timm model name in ``timm/<name>`` (e.g. ``resnet50`` or ``resnet50.a1_in1k``)."""
    return name[len(TIMM_PREFIX):]


def import_timm():
    """Imports timm (the optional ``timm`` extra).

    Raises:
        ConfigError: One line with the install command if timm cannot be imported.
    """
    try:
        import timm
    except ImportError as e:
        why = "is not installed" if isinstance(e, ModuleNotFoundError) or "None in sys.modules" in str(e) else (
            f"cannot be imported ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        raise ConfigError(f"timm/<name> models need timm, which {why}: {TIMM_INSTALL_HINT}") from None
    return timm


def _check_timm_name(name: str) -> None:
    timm = import_timm()
    arch = timm_arch(name)
    if not arch:
        raise ConfigError(f"{name!r} names no timm model; use timm/<name>, e.g. timm/resnet50")
    if timm.is_model(arch):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(TIMM_PREFIX + c) for c in close)}? " if close else ""
    raise ConfigError(f"unknown timm model {name!r}; {hint}timm.list_models() lists the {len(known)} timm models")


def _is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "pretrained_cfg") and callable(getattr(model, "get_classifier", None))


def _timm_classifier_path(model: nn.Module) -> str | None:
    """Dotted name of a timm model's ``get_classifier()`` layer, or None (not timm, or no such layer)."""
    if not _is_timm_model(model):
        return None
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)) and classifier:  # distilled models: (head, head_dist)
        classifier = classifier[0]
    if not isinstance(classifier, nn.Module) or getattr(classifier, "weight", None) is None:
        return None
    return next((n for n, m in model.named_modules() if m is classifier and n), None)


@functools.cache
def _timm_input_rule(name: str) -> tuple[int | None, int | None]:
    cfg = getattr(meta_model(name), "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1]), None
    return None, None


def timm_stages(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """A timm model's freeze points, from timm's own stage grouping.

    The groups are those of ``model.group_matcher(coarse=True)`` (what timm uses for layer-wise
    learning-rate decay), or, for a model without one, one group per ``model.feature_info`` module.
    A group timm names once (``stem``) keeps that name; the numbered groups (timm's ``blocks``) are
    named after their first module (``layer1``, ``stages_0``, ``blocks_3``). Parameters timm leaves
    unmatched (the neck and classifier) and ``get_classifier()`` form ``head``. Members are the
    outermost modules (or loose parameters) lying wholly inside one group.
    """
    params = [n for n, _ in model.named_parameters()]
    head = head_path(model)
    matcher = None
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError):
        matcher = model.group_matcher(coarse=True)
    groups = _matcher_groups(model, matcher) if matcher else _feature_info_groups(model, params, head)
    if not groups:
        return _generic(model)
    # Everything from the group holding the classifier on is the head.
    gid_of: dict[str, int] = {}
    labels: list[str | None] = []
    head_gid = None
    for label, names in groups:
        if head_gid is None and any(stage_members_cover(n, (head,)) for n in names):
            head_gid = len(labels)
            labels.append("head")
        elif head_gid is None:
            labels.append(label)
        gid = head_gid if head_gid is not None else len(labels) - 1
        for n in names:
            gid_of[n] = gid
    for n in params:
        if stage_members_cover(n, (head,)) or n not in gid_of:
            if head_gid is None:
                head_gid = len(labels)
                labels.append("head")
            gid_of[n] = head_gid
    members = _collapse({n: gid_of[n] for n in params})
    out: dict[str, tuple[str, ...]] = {}
    counts = {label: labels.count(label) for label in labels}
    for gid, label in enumerate(labels):
        if gid == head_gid or not members.get(gid):
            continue
        name = label if label and counts[label] == 1 else members[gid][0].replace(".", "_")
        if name in out or name == "head":
            name = f"{label or 'group'}{gid}"
        out[name] = tuple(members[gid])
    out["head"] = tuple(members.get(head_gid, (head,)))
    return out


def _matcher_groups(model: nn.Module, matcher) -> list[tuple[str | None, list[str]]]:
    """The coarse parameter groups of timm in order, each with the matcher key that made it (None: unmatched)."""
    from timm.models import group_parameters

    grouped = group_parameters(model, matcher)
    out = []
    for gid in sorted(grouped):
        names = list(grouped[gid])
        out.append((_matcher_label(matcher, names[0]) if names else None, names))
    return out


def _matcher_label(matcher, param: str) -> str | None:
    if not isinstance(matcher, dict):
        return None
    for label, spec in matcher.items():
        if spec is None:
            continue
        specs = [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
        if any(re.match(s, param) for s in specs):
            return label
    return None


def _feature_info_groups(model: nn.Module, params: list[str], head: str) -> list[tuple[str | None, list[str]]]:
    """One group per ``feature_info`` module; parameters before the first go to ``stem``.

    Parameters between two feature modules join the group before them; the classifier is left
    out (it becomes ``head``).
    """
    info = getattr(model, "feature_info", None)
    modules = [f["module"] for f in info] if info else []
    if not modules:
        return []
    groups: dict[str, list[str]] = {"stem": []}
    current = "stem"
    for n in params:
        if stage_members_cover(n, (head,)):
            continue
        owner = next((m for m in modules if stage_members_cover(n, (m,))), None)
        if owner is not None:
            current = owner
        groups.setdefault(current, []).append(n)
    return [(k if k == "stem" else None, v) for k, v in groups.items() if v]


def _collapse(gid_of: dict[str, int]) -> dict[int, list[str]]:
    """Each group's outermost module paths (or loose parameter names) whose parameters are all in it."""
    under: dict[str, set[int]] = {}
    for p, g in gid_of.items():
        parts = p.split(".")
        for i in range(1, len(parts)):
            under.setdefault(".".join(parts[:i]), set()).add(g)
    out: dict[int, list[str]] = {}
    for p, g in gid_of.items():
        parts = p.split(".")
        member = next((".".join(parts[:i]) for i in range(1, len(parts)) if under[".".join(parts[:i])] == {g}), p)
        if member not in out.setdefault(g, []):
            out[g].append(member)
    return out


# --------------------------------------------------------------------------------------------
# The catalog behind `freezetune models`


@dataclass
class ModelInfo:
    """One model of the catalog.

    Attributes:
        name: torchvision name.
        family: Architecture family (see :func:`family`).
        rule: How the family's freeze points are named.
        default: Whether this is freezetune's default model.
        head: Dotted name of the classifier layer that is replaced for ``num_classes``.
        stages: Freeze point -> the modules (or loose parameters) it covers.
        params: Parameters with a ``num_classes`` head.
        stage_params: Parameters inside each stage.
        trainable_until: Parameters still training with ``freeze.until: STAGE``, per stage.
        fast_path: Whether frozen-prefix execution (no-autograd prefix, BatchNorm folding, the
            feature cache) is available.
    """

    name: str
    family: str
    rule: str
    default: bool
    head: str
    stages: dict[str, list[str]]
    params: int
    stage_params: dict[str, int] = field(default_factory=dict)
    trainable_until: dict[str, int] = field(default_factory=dict)
    fast_path: bool = False

    @property
    def freeze_points(self) -> list[str]:
        """Stages usable as ``freeze.until`` (all but ``head``)."""
        return [s for s in self.stages if s != "head"]


def select_models(pattern: str | None = None) -> list[str]:
    """Model names matching an fnmatch pattern (a plain name matches itself), sorted.

    Raises:
        ConfigError: If nothing matches; the message suggests close names.
    """
    if not pattern:
        return list(model_names())
    if is_timm_name(pattern):
        arch = timm_arch(pattern)
        if not any(c in arch for c in "*?["):
            check_model_name(pattern)
            return [pattern]
        hits = [TIMM_PREFIX + n for n in import_timm().list_models(arch)]
        if not hits:
            raise ConfigError(f"no timm model matches {pattern!r}")
        return hits
    hits = [n for n in model_names() if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        check_model_name(pattern)  # raises with "did you mean"
    return hits


def describe(name: str, num_classes: int = 1000) -> ModelInfo:
    """Builds a model on the meta device and describes its freeze points and parameter counts."""
    model = meta_model(name)
    order = derive_stages(name, model)  # not stages(): that would build the model again
    replace_head(model, num_classes)
    params = dict(model.named_parameters())
    per_stage = {
        stage: sum(p.numel() for n, p in params.items() if stage_members_cover(n, members))
        for stage, members in order.items()
    }
    total = sum(p.numel() for p in params.values())
    trainable, frozen = {}, 0
    for stage in order:
        if stage == "head":
            break
        frozen += per_stage[stage]
        trainable[stage] = total - frozen
    return ModelInfo(
        name=name,
        family=family(name),
        rule=TIMM_RULE if is_timm_name(name) else FAMILY_RULES.get(family(name), GENERIC_RULE),
        default=name == DEFAULT_MODEL,
        head=head_path(model),
        stages={s: list(m) for s, m in order.items()},
        params=total,
        stage_params=per_stage,
        trainable_until=trainable,
        fast_path=is_resnet(name),
    )


def catalog(pattern: str | None = None, num_classes: int = 1000) -> list[ModelInfo]:
    """Describes every model matching ``pattern``, grouped by family (default family first)."""
    infos = [describe(n, num_classes) for n in select_models(pattern)]
    order = list(FAMILY_RULES)
    return sorted(infos, key=lambda i: (
        order.index(i.family) if i.family in order else len(order), i.family, _natural(i.name)
    ))


def _natural(name: str) -> list:
    # resnet18 before resnet101
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def compact_points(points: list[str]) -> str:
    """``a, b, encoder_layer_0..encoder_layer_11, c``: runs of numbered names shortened."""
    out: list[str] = []
    i = 0
    while i < len(points):
        m = re.fullmatch(r"(.*?)(\d+)", points[i])
        j = i
        while m and j + 1 < len(points) and points[j + 1] == f"{m.group(1)}{int(m.group(2)) + j + 1 - i}":
            j += 1
        out.append(points[i] if j - i < 2 else f"{points[i]}..{points[j]}")
        i = j + 1
    return ", ".join(out)

