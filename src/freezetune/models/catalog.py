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

``timm/<name>`` (the optional ``timm`` extra) names a timm model. The functions here accept those
names, and timm models, too, and hand them to :mod:`freezetune.models.timm_models`, the one module
with timm code in it. Generic module-tree helpers (meta-device building, stage membership, the
last layer) are in :mod:`freezetune.models.structure`; what ``freezetune models`` lists is in
:mod:`freezetune.models.listing`.
"""

from __future__ import annotations

import difflib
import functools
import re

import torchvision
from torch import nn

from freezetune.errors import ConfigError
from freezetune.models import timm_models
from freezetune.models.structure import last_layer_path, on_meta
from freezetune.models.timm_models import is_timm_name

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
    "resnet": "stem (conv1 bn1 relu maxpool), layer1..layer4, head (avgpool fc); "
    "block points layer1.0 .. layer4.N cut each stage at its residual blocks",
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
        timm_models.check_name(name)
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
        return timm_models.build(name)
    return torchvision.models.get_model(name, weights=None, **_BUILD_KWARGS.get(name, {}))


def meta_model(name: str) -> nn.Module:
    """The model with every tensor on the meta device: its structure, with no memory or init cost."""
    if is_timm_name(name):
        return timm_models.meta_model(name)
    # Not `with torch.device("meta")`: RegNet's builder computes its widths with tensors.
    return on_meta(lambda: build(name))


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


def block_points(name: str) -> dict[str, tuple[str, ...]]:
    """The model's finest freeze points: a ResNet's stages cut at every residual block.

    ``stem``, ``layer1.0``, ``layer1.1`` ... ``layer4.N``, ``head`` for a ResNet (the block counts
    are the variant's own: resnet50 has ``layer3.0`` to ``layer3.5``); each block point covers that
    one block, so freezing through ``layer2.0`` leaves ``layer2.1`` training. A stage's last block
    covers the same parameters as the stage. Other models have no finer points than their stages.

    Raises:
        ConfigError: If ``name`` is not a classification model.
    """
    return dict(_block_points(name))


@functools.cache
def _block_points(name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    order = _stages(name)
    if not is_resnet(name):
        return order
    return tuple(resnet_block_points(meta_model(name)).items())


def resnet_block_points(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """:func:`block_points` read off a (meta or real) torchvision ResNet."""
    points: dict[str, tuple[str, ...]] = {}
    for stage, members in RESNET_STAGES.items():
        if stage.startswith("layer"):
            points.update((f"{stage}.{i}", (f"{stage}.{i}",)) for i in range(len(getattr(model, stage))))
        else:
            points[stage] = members
    return points


def is_block_point(name: str, point: str) -> bool:
    """Whether ``point`` is one of the model's block points that is not also a stage (``layer2.0``)."""
    return point not in stages(name) and point in block_points(name)


def stage_of(name: str, point: str) -> str:
    """The stage a freeze point belongs to: ``layer2`` for ``layer2.0``, the stage itself for a stage."""
    return point if point in stages(name) else point.split(".", 1)[0]


def stage_blocks(name: str, stage: str) -> tuple[str, ...]:
    """The block points inside a stage, in order: ``layer2.0``, ``layer2.1`` for a ResNet18's ``layer2``.

    Empty for a stage that is a single point (``stem``, ``head``, every stage of a model without
    block points).
    """
    order = stages(name)
    return tuple(p for p in block_points(name) if p not in order and stage_of(name, p) == stage)


def last_block(name: str, stage: str) -> str:
    """The block point that freezes what ``stage`` freezes: its last block, or the stage itself."""
    inside = stage_blocks(name, stage)
    return inside[-1] if inside else stage


def forward_modules(name: str) -> tuple[str, ...]:
    """A ResNet's forward as a sequence of modules, one per block point member, for splitting it anywhere.

    ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1.0`` ... ``layer4.N``, ``avgpool``, ``fc``:
    running them in turn (flattening before ``fc``) is the model's own forward, operation for operation.
    """
    return tuple(m for members in block_points(name).values() for m in members)


def derive_stages(name: str, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Reads the freeze points of a (meta or real) model of this name off its structure."""
    if is_timm_name(name):
        return timm_models.timm_stages(model) or _generic(model)
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
    return timm_models.classifier_path(model) or last_layer_path(model)


def input_size_rule(name: str) -> tuple[int | None, int | None]:
    """``(exact, minimum)`` input size a model needs (None: no constraint)."""
    if is_timm_name(name):
        return timm_models.input_size_rule(name)
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
    if timm_models.owns_head(model):
        return timm_models.replace_head(model, num_classes)
    name, layer = head_layer(model)
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
