"""The arms of a comparison: which freeze specs run, in which modes, with which config.

Modes are defined once, here. The freeze points of ``compare depths`` come from the model catalog,
so the sweep works for every model family, not only ResNets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freezetune.config import Config, FreezeConfig
from freezetune.errors import ConfigError
from freezetune.models import catalog

# The ResNet freeze points, shallowest first; the last one leaves only fc training.
DEPTHS = tuple(s for s in catalog.RESNET_STAGES if s != "head")
BASELINE = "full"
# Ways of running a frozen arm, measured side by side (see ArmSpec.mode): the plain requires_grad=False
# loop, freezetune's optimized path, and that path with the feature cache filled.
MODES = ("plain", "optimized", "cached")


@dataclass
class ArmSpec:
    """What distinguishes one arm from the others.

    Attributes:
        name: Short key used in the JSON output (``full``, ``frozen``, ``layer3``...).
        label: What a person reads in tables and plots.
        freeze: The ``freeze`` config section for this arm, as plain data.
        mode: How the frozen part is run: ``full`` for the baseline, ``plain`` (a plain
            ``requires_grad=False`` loop: BatchNorm in train mode, no fast path, every parameter
            handed to torch's default SGD), ``optimized`` (freezetune's path) or ``cached`` (the same
            with the feature cache filled, so every step is a later-epoch step).
        depth: The freeze point of a depth-sweep arm, else None.
    """

    name: str
    label: str
    freeze: dict = field(default_factory=dict)
    mode: str = "optimized"
    depth: str | None = None


def freeze_points(model_name: str, blocks: bool = False) -> tuple[str, ...]:
    """The model's freeze points from the catalog, shallowest first (``head`` excluded).

    With ``blocks``, a ResNet's block points (``layer1.0`` ... ``layer4.N``) in place of its stages.
    """
    order = catalog.block_points(model_name) if blocks else catalog.stages(model_name)
    return tuple(s for s in order if s != "head")


def frozen_vs_full_arms(config: Config, modes: tuple[str, ...] = MODES) -> list[ArmSpec]:
    """The arms of ``compare frozen-vs-full``: everything trainable, and the config's freeze spec.

    The frozen spec is run once per mode: ``frozen`` (freezetune's path), ``frozen:plain`` and
    ``frozen:cached``. A ``freeze.schedule`` (gradual unfreezing) is kept: every arm trains the
    first steps of the run the config describes, so a phase that starts within them takes effect.

    Raises:
        ConfigError: If the config freezes nothing, so both arms would be the same, or on a bad mode.
    """
    spec = config.freeze
    if spec.trainable is None and spec.frozen is None and spec.until is None:
        raise ConfigError(
            "the config freezes nothing (no freeze.trainable, freeze.frozen or freeze.until), "
            "so the frozen arm would equal the full one; e.g. add freeze.until=layer3"
        )
    full = ArmSpec(BASELINE, "all trainable", _freeze_dict(FreezeConfig(batchnorm=spec.batchnorm)), "full")
    return [full, *_mode_arms("frozen", _describe_freeze(spec, config.model.name), spec, check_modes(modes), None)]


def depth_arms(config: Config, stages: tuple[str, ...] | None = None, modes: tuple[str, ...] = MODES) -> list[ArmSpec]:
    """The arms of ``compare depths``: full, then frozen through each freeze point (the last: head only).

    Each freeze point is run in every mode: ``layer3`` (freezetune's path), ``layer3:plain`` and
    ``layer3:cached``. The config's own freeze selectors are ignored; its BatchNorm policy applies.

    Args:
        config: The base config.
        stages: The freeze points to sweep: stages and, for a ResNet, block points (``layer2.0``),
            or ``("blocks",)`` for every block point (the model's stages by default).
        modes: A subset of :data:`MODES` that includes ``optimized``.

    Raises:
        ConfigError: On a name that is not a freeze point of the model, or a bad mode.
    """
    name = config.model.name
    points = chosen_points(name, stages)
    modes = check_modes(modes)
    bn = config.freeze.batchnorm
    arms = [ArmSpec(BASELINE, "all trainable", _freeze_dict(FreezeConfig(batchnorm=bn)), "full")]
    for point in _by_depth(name, points):
        arms.extend(_mode_arms(point, _until_label(point, freeze_points(name), name),
                               FreezeConfig(until=point, batchnorm=bn), modes, point))
    return arms


def _by_depth(model_name: str, points: tuple[str, ...]) -> list[str]:
    """Stages and block points, shallowest first (a stage where its last block would be)."""
    order = []
    for block in freeze_points(model_name, blocks=True):
        order.append(block)
        stage = catalog.stage_of(model_name, block)
        if stage != block and catalog.last_block(model_name, stage) == block:
            order.append(stage)
    return [p for p in order if p in points]


def chosen_points(model_name: str, chosen: tuple[str, ...] | None) -> tuple[str, ...]:
    """The freeze points a depth sweep runs: the stages (None), every block point (``blocks``), or a selection.

    A stage and its last block are the same freeze (``layer1`` and ``layer1.1`` in a ResNet18), so
    ``blocks`` names each by its block and a selection may hold either, not both.

    Raises:
        ConfigError: On a name that is not a freeze point, or a stage given with its last block.
    """
    if chosen is None:
        return freeze_points(model_name)
    if tuple(chosen) == ("blocks",):
        return freeze_points(model_name, blocks=True)
    known = freeze_points(model_name) + freeze_points(model_name, blocks=True)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        choices = ", ".join(dict.fromkeys(known))
        raise ConfigError(f"unknown freeze point(s) {', '.join(unknown)}; choose from {choices}")
    same = [(s, b) for s in chosen for b in chosen if s != b and _same_point(model_name, s, b)]
    if same:
        raise ConfigError(f"{same[0][0]} and {same[0][1]} freeze the same parameters; give one of them")
    return tuple(chosen)


def inner_blocks(model_name: str) -> tuple[str, ...]:
    """Block points that end inside a stage (``layer2.0`` in a ResNet18; a stage's last block is the stage)."""
    return tuple(p for stage in catalog.stages(model_name) for p in catalog.stage_blocks(model_name, stage)[:-1])


def _same_point(model_name: str, stage: str, block: str) -> bool:
    return stage in catalog.stages(model_name) and block == catalog.last_block(model_name, stage)


def check_modes(modes) -> tuple[str, ...]:
    """Validates a selection of :data:`MODES` (``optimized`` is required) and puts it in order.

    Raises:
        ConfigError: On an unknown mode, or one without ``optimized``.
    """
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if "optimized" not in modes:
        raise ConfigError("modes must include optimized: the other modes are reported against it")
    return tuple(m for m in MODES if m in modes)


def arm_config(config: Config, arm: ArmSpec, weights_path: Path, arm_dir: Path) -> Config:
    """The config one arm trains with: its freeze spec and mode, the shared initial weights, its folder.

    Validation data is dropped because a comparison never evaluates, so no arm pays to build it.
    Only ``cached`` arms use the feature cache. ``plain`` arms put BatchNorm in train mode and turn
    the frozen-prefix path off (the recipe gives them the plain optimizer).
    """
    data = config.to_dict()
    data["freeze"] = dict(arm.freeze)
    data["model"]["weights"] = str(weights_path)
    data["data"]["val_size"] = 0
    data["train"]["feature_cache"] = "on" if arm.mode == "cached" else "off"
    if arm.mode == "plain":
        data["freeze"]["batchnorm"] = "train"
        data["train"]["fold_batchnorm"] = False
    data["output"] = {"dir": str(arm_dir), "overwrite": True}
    return Config.model_validate(data)


def arm_folder(arm_name: str) -> str:
    """The arm's folder name under ``<out>/arms/``."""
    return arm_name.replace(":", "-")


def _mode_arms(name: str, label: str, spec: FreezeConfig, modes: tuple[str, ...], depth: str | None) -> list[ArmSpec]:
    return [ArmSpec(name if mode == "optimized" else f"{name}:{mode}", label, _freeze_dict(spec), mode, depth)
            for mode in modes]


def _freeze_dict(spec: FreezeConfig) -> dict:
    data = spec.model_dump(mode="json")
    return {k: v for k, v in data.items() if v is not None and v != []}


def _until_label(point: str, points: tuple[str, ...], model_name: str) -> str:
    if point != points[-1] and point != catalog.last_block(model_name, points[-1]):
        return f"frozen ..{point}"
    return "fc only" if catalog.is_resnet(model_name) else "head only"


def _describe_freeze(spec: FreezeConfig, model_name: str) -> str:
    if spec.until is not None:
        return _until_label(spec.until, freeze_points(model_name), model_name)
    if spec.trainable is not None:
        return "training " + ", ".join(spec.trainable)
    return "frozen " + ", ".join(spec.frozen or [])
