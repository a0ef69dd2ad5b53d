"""The arms of a sweep: which configs run, and the one config each (arm, seed) trains with.

By default a sweep has ``full`` (everything trains) and one arm per freeze point of the model, named
as in ``compare depths`` and taken from the model catalog. ``bn``, ``bias`` and ``lora-r8`` (every
pretrained weight frozen, a sliver trained) join when named. An arms file adds arms or replaces default ones;
each arm is the user's config with its freeze selectors and ``adapt`` removed (the BatchNorm policy
kept) and the arm's overrides applied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from freezetune.compare.arms import BASELINE, depth_arms, inner_blocks
from freezetune.config import Config, apply_overrides, read_yaml, validate_config
from freezetune.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Keys an arm may not change: every arm must see the same data, seeds, budget and folder layout,
# or its accuracy would not be comparable with the others'.
_FIXED = ("seed", "output", "data.source", "data.root", "data.image_size", "data.train_size",
          "data.val_size", "data.download", "data.skip_bad_images", "model.num_classes",
          "train.epochs", "train.max_steps")


@dataclass(frozen=True)
class SweepArm:
    """One way of training the config.

    Attributes:
        name: Short key (``full``, ``stem`` ... ``layer4``, or a name from the arms file).
        label: What a person reads in tables and plots.
        overrides: Dotted config keys and their values, applied to the config with its freeze
            selectors removed.
    """

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    lr_grid: tuple[float, ...] | None = None  # multipliers of the arm's rate; None: the sweep's grid

    def as_dict(self) -> dict:
        """Plain data for the manifest."""
        return {"name": self.name, "label": self.label, "overrides": dict(self.overrides),
                "lr_grid": None if self.lr_grid is None else list(self.lr_grid)}


class _ArmEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    label: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    lr_grid: list[float | int] | None = None


AUTO = "auto"
# Multipliers of the config's learning rate: a log grid spanning 100x. A linear probe often wants
# 10-100x the rate of full fine-tuning and one early block a rate of its own, so one rate for every
# arm would measure which arm suits that rate, not which layers to freeze.
DEFAULT_LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


def check_lr_grid(grid, where: str) -> tuple[float, ...]:
    """A learning-rate grid as sorted, distinct, positive multipliers.

    Raises:
        ConfigError: Naming ``where``, if the grid is empty or holds a value that is not a positive number.
    """
    values = list(grid)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf")]
    if not values or bad:
        raise ConfigError(f"{where}: a learning-rate grid is one or more positive multipliers of the config's rate "
                          f"(e.g. 0.1,0.3,1,3,10), got {values if not bad else bad[0]!r}")
    return tuple(sorted({float(v) for v in values}))


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """``--lr-grid 0.1,0.3,1,3,10``: multipliers of the config's learning rate.

    Raises:
        ConfigError: If a value is not a positive number.
    """
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(float(part.rstrip("xX")))
        except ValueError:
            raise ConfigError(f"--lr-grid {text!r}: {part!r} is not a number; give multipliers of the config's "
                              "rate, e.g. 0.1,0.3,1,3,10") from None
    return check_lr_grid(values, f"--lr-grid {text!r}")


def multiplier_name(multiplier: float) -> str:
    """``0.3`` -> ``x0.3``, ``10.0`` -> ``x10``: a rate's name in folders and tables."""
    return f"x{multiplier:g}"


def default_arms(config: Config) -> list[SweepArm]:
    """``full``, frozen through each of the model's freeze points (the last leaves the head only), and ``auto``.

    ``auto`` is adaptive freezing from full fine-tuning, with the config's own ``freeze.auto``
    options when it has them (the defaults otherwise).
    """
    arms = []
    for spec in depth_arms(config, modes=("optimized",)):
        overrides = {} if spec.name == BASELINE else {"freeze.until": spec.depth}
        arms.append(SweepArm(spec.name, spec.label if spec.name != BASELINE else "full fine-tuning", overrides))
    auto = config.freeze.auto.model_dump(exclude_unset=True) if config.freeze.auto is not None else {}
    arms.append(SweepArm(AUTO, "adaptive (freeze.auto)", {"freeze.auto": auto or True}))
    return arms


# Every pretrained weight frozen, a sliver trains (adapt.method); each arm's grid is centred on a
# rate of its own, as a multiple of the config's. BatchNorm-only and bias-only move so few
# parameters that they need larger steps: on the digits input-shift task both did best at 10x the
# rate of full fine-tuning's grid centre, as BitFit tuned biases at 10-50x. LoRA did best at 1x
# and lower, and diverged from 10x up (its update is scaled by alpha / rank), so its grid keeps
# the config's centre (docs/sliver.md#measured).
SLIVER_ARMS = {
    "bn": ("BatchNorm only (adapt.method: bn)", {"adapt.method": "bn"}, 10.0),
    "bias": ("biases only (adapt.method: bias)", {"adapt.method": "bias"}, 10.0),
    "lora-r8": ("LoRA rank 8 on every conv (adapt.method: lora)", {"adapt.method": "lora", "adapt.lora.rank": 8},
                1.0),
}


def optional_arms(config: Config) -> list[SweepArm]:
    """Arms a sweep runs only when named (``--only`` or an arms-file entry without overrides).

    ``bn``, ``bias`` and ``lora-r8`` train a sliver of every stage instead of a suffix of stages;
    they are not default arms until a measurement shows they pay for their place. A ResNet's
    block points that end inside a stage (``layer2.0``: frozen through the first block of
    ``layer2``) are finer steps between the default depths; each would add a whole arm's runs.
    """
    arms = []
    for name, (label, overrides, scale) in SLIVER_ARMS.items():
        rate = {} if scale == 1.0 else {"optim.lr": float(f"{config.optim.lr * scale:.12g}")}
        arms.append(SweepArm(name, label, {**overrides, **rate}))
    return arms + [SweepArm(point, f"frozen ..{point} (a block point)", {"freeze.until": point})
                   for point in inner_blocks(config.model.name)]


def load_arms_file(path: str | Path) -> list[SweepArm]:
    """Reads an arms file: a YAML list of ``{name, label (optional), overrides}``.

    Raises:
        ConfigError: Naming the file and the entry, on anything but a list of valid entries.
    """
    path = Path(path)
    raw = read_yaml(path, "arms file")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: an arms file is a non-empty YAML list of {{name, overrides}} entries")
    arms = []
    for i, item in enumerate(raw):
        try:
            entry = _ArmEntry.model_validate(item)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "entry"
            raise ConfigError(f"{path}: arm {i + 1}: {where}: {err['msg']}") from None
        if not _NAME_RE.match(entry.name):
            raise ConfigError(f"{path}: arm {i + 1}: name {entry.name!r} must be letters, digits, '_', '.', '-'")
        grid = None if entry.lr_grid is None else check_lr_grid(entry.lr_grid, f"{path}: arm {i + 1}: lr_grid")
        arms.append(SweepArm(entry.name, entry.label or entry.name, dict(entry.overrides), grid))
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: arm name(s) given twice: {', '.join(dupes)}")
    return arms


def merge_arms(defaults: list[SweepArm], extra: list[SweepArm], only: list[str] | None = None,
               optional: list[SweepArm] | None = None) -> list[SweepArm]:
    """Defaults with the file's arms replacing same-named ones and the rest appended; ``only`` selects.

    An ``optional`` arm (see :func:`optional_arms`) joins when ``only`` names it, or when the file
    has an entry of its name without overrides (the entry's label and ``lr_grid`` still apply).

    Raises:
        ConfigError: If ``only`` names an unknown arm, or fewer than two arms are left.
    """
    by_name = {a.name: a for a in defaults}
    builtin = {a.name: a for a in optional or []}
    for arm in extra:
        base = builtin.get(arm.name)
        if base is not None and not arm.overrides:
            arm = SweepArm(arm.name, base.label if arm.label == arm.name else arm.label, dict(base.overrides),
                           arm.lr_grid)
        by_name[arm.name] = arm
    for name in only or []:
        if name not in by_name and name in builtin:
            by_name[name] = builtin[name]
    arms = list(by_name.values())
    if only:
        unknown = [n for n in only if n not in by_name]
        if unknown:
            known = list(by_name) + [n for n in builtin if n not in by_name]
            raise ConfigError(f"--only: unknown arm(s) {', '.join(unknown)}; the arms are {', '.join(known)}")
        arms = [a for a in arms if a.name in only]
    if len(arms) < 2:
        raise ConfigError(f"a sweep needs at least two arms to compare (got {', '.join(a.name for a in arms)})")
    return arms


def arm_config(config: Config, arm: SweepArm, seed: int, run_dir: Path, feature_cache: str = "auto",
               lr_multiplier: float = 1.0) -> Config:
    """The complete config of one (arm, rate, seed): what ``freezetune train`` would run for it.

    Args:
        config: The user's config.
        arm: The arm; its overrides apply to the config with the freeze selectors removed.
        seed: The run's seed.
        run_dir: The run's folder.
        feature_cache: ``train.feature_cache`` for every arm (``auto``: each arm takes the cache
            wherever it is correct and pays off).
        lr_multiplier: Multiplies ``optim.lr`` as the arm sets it (the config's, unless the arm
            overrides it).

    Raises:
        ConfigError: If an override changes a key every arm must share, or makes the config invalid.
    """
    fixed = [k for k in arm.overrides if any(k == f or k.startswith(f + ".") for f in _FIXED)]
    if fixed:
        raise ConfigError(
            f"arm {arm.name}: may not override {', '.join(fixed)} "
            "(every arm trains on the same data, seeds and budget, so their accuracies compare)"
        )
    data = config.to_dict()
    data["freeze"] = {"batchnorm": config.freeze.batchnorm}
    data["adapt"] = {}  # like the freeze selectors, what trains is the arm's to say
    data["seed"] = seed
    data["train"]["feature_cache"] = feature_cache
    data["output"] = {"dir": str(run_dir), "overwrite": True}
    # JSON is YAML, so every value (a list, a schedule of mappings) goes through the override parser.
    data, _ = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in arm.overrides.items()])
    if lr_multiplier != 1.0:
        # Twelve significant digits: 0.01 x 3 is written 0.03, not 0.030000000000000002.
        data["optim"]["lr"] = float(f"{data['optim']['lr'] * lr_multiplier:.12g}")
    return validate_config(data, [], source=f"arm {arm.name}")
