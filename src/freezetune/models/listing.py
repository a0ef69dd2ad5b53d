"""What ``freezetune models`` lists: the models matching a pattern, each described from its structure.

Every model is built on the meta device (no weights, no memory), its freeze points read off as
:func:`freezetune.models.catalog.derive_stages` reads them, its head sized for ``num_classes``,
and its parameters counted per freeze point. ``ModelInfo.to_row`` is the plain dict the command
prints as JSON and :mod:`freezetune.render.models` draws as tables.

Layer 3, above ``config``: nothing below the command line needs the listing, so config's name
check (:func:`freezetune.models.catalog.check_model_name`) never imports it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field

from freezetune.models import timm_models
from freezetune.models.catalog import (
    DEFAULT_MODEL,
    FAMILY_RULES,
    GENERIC_RULE,
    check_model_name,
    derive_stages,
    family,
    head_path,
    is_resnet,
    meta_model,
    model_names,
    replace_head,
    resnet_block_points,
)
from freezetune.models.structure import stage_members_cover


@dataclass
class ModelInfo:
    """One model of the catalog.

    Attributes:
        name: torchvision name.
        family: Architecture family (see :func:`freezetune.models.catalog.family`).
        rule: How the family's freeze points are named.
        default: Whether this is freezetune's default model.
        head: Dotted name of the classifier layer that is replaced for ``num_classes``.
        stages: Freeze point -> the modules (or loose parameters) it covers.
        params: Parameters with a ``num_classes`` head.
        stage_params: Parameters inside each stage.
        trainable_until: Parameters still training with ``freeze.until: STAGE``, per stage.
        fast_path: Whether frozen-prefix execution (no-autograd prefix, BatchNorm folding, the
            feature cache) is available.
        blocks: Finer freeze points than the stages (a ResNet's ``layer1.0`` ... ``layer4.N``).
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
    blocks: list[str] = field(default_factory=list)

    @property
    def freeze_points(self) -> list[str]:
        """Stages usable as ``freeze.until`` (all but ``head``)."""
        return [s for s in self.stages if s != "head"]

    def to_row(self) -> dict:
        """The plain dict ``freezetune models --json`` prints: every field, plus ``freeze_points``."""
        return {**asdict(self), "freeze_points": self.freeze_points}


def select_models(pattern: str | None = None) -> list[str]:
    """Model names matching an fnmatch pattern (a plain name matches itself), sorted.

    Raises:
        ConfigError: If nothing matches; the message suggests close names.
    """
    if not pattern:
        return list(model_names())
    if timm_models.is_timm_name(pattern):
        return timm_models.select(pattern)
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
        rule=timm_models.TIMM_RULE if timm_models.is_timm_name(name) else FAMILY_RULES.get(family(name), GENERIC_RULE),
        default=name == DEFAULT_MODEL,
        head=head_path(model),
        stages={s: list(m) for s, m in order.items()},
        params=total,
        stage_params=per_stage,
        trainable_until=trainable,
        fast_path=is_resnet(name),
        blocks=[p for p in resnet_block_points(model) if p not in order] if is_resnet(name) else [],
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
