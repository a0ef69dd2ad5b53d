"""Typed, strict run configuration.

A config is a YAML file plus ``key=value`` overrides. Both go through the same pydantic models, so
an override can never smuggle in a value the file could not hold. Unlike torchtune or timm, unknown
keys are rejected (with a "did you mean" hint) because a silently ignored typo such as
``optim.lr_rate`` is the most expensive kind of config bug: the run works, just not as intended.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from freezetune.errors import ConfigError, MissingExtraError, first_line

# The ResNets: the default family, with fixed freeze points and the frozen-prefix fast path. Any
# torchvision classification model is accepted; freezetune.models.catalog lists them with their freeze points.
MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
WEIGHTS_KEYWORDS = ("imagenet", "auto", "none")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# freeze.auto: intervals with fewer measured steps than this freeze nothing. Below it, the spread
# of the per-step gradient norms (the noise the rule holds each change against) is itself too
# uncertain to trust (docs/auto-freeze.md, "The minimum").
MIN_STEPS = 8
# One accuracy point: how far below the best an arm may end and still count as reaching it (the
# sweep's default --tolerance), and how far below its best so far a freeze.auto run may fall after
# a freeze before it says so.
DEFAULT_TOLERANCE = 0.01


class _Strict(BaseModel):
    # strict: YAML already gives typed values, so "5" for an int is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelConfig(_Strict):
    """Which network to fine-tune and what it starts from."""

    name: str = "resnet18"
    num_classes: int = Field(10, ge=1)
    weights: str = "auto"

    @field_validator("weights")
    @classmethod
    def _weights_value(cls, v: str) -> str:
        if v in WEIGHTS_KEYWORDS:
            return v
        if not v.endswith((".pth", ".pt", ".safetensors")):
            raise ValueError(
                f"{v!r} is neither {', '.join(WEIGHTS_KEYWORDS)} nor a .pth/.pt/.safetensors path"
            )
        return v


class UnfreezeStep(_Strict):
    """One phase of gradual unfreezing: at the start of ``epoch``, these patterns start training."""

    epoch: int = Field(ge=1)
    unfreeze: list[str] = Field(min_length=1)
    lr_mult: float = Field(1.0, gt=0)


class AutoFreezeConfig(_Strict):
    """Adaptive freezing (``freeze.auto``): stages freeze, input side first, once they clearly stop learning.

    The run is cut into intervals of ``every_steps`` optimizer steps (by default the budget over
    ``checks``). After the step that closes an interval, mid-epoch included, each trainable stage's
    mean gradient norm over it is compared with the interval before, against the noise of both
    means; the longest run of trainable stages from the input side whose change is below the cut
    *beyond that noise* freezes (never the head, never past ``max_stage``). ``units: blocks`` (the
    default) measures and freezes a ResNet block by block (``layer2.0``), ``stages`` a stage at a
    time; models without block points use their stages either way. See docs/auto-freeze.md.
    """

    checks: int = Field(10, ge=2)
    every_steps: int | None = Field(None, ge=1)
    min_steps: int = Field(MIN_STEPS, ge=2)
    noise_z: float = Field(2.0, ge=0)
    criterion: Literal["percentile", "threshold"] = "percentile"
    percentile: float = Field(50.0, gt=0, lt=100)
    threshold: float = Field(0.05, gt=0)
    max_stage: str | None = None
    units: Literal["blocks", "stages"] = "blocks"

    @model_validator(mode="before")
    @classmethod
    def _epoch_intervals_retired(cls, data: Any) -> Any:
        # Run folders written before step-level checks hold every: 1 and start_epoch: null (the
        # defaults then): read them, so such a run still evaluates and exports. Any other value
        # meant epochs, which no longer exist here.
        if isinstance(data, dict) and ("every" in data or "start_epoch" in data):
            data = dict(data)
            every, start = data.pop("every", 1), data.pop("start_epoch", None)
            if every != 1 or start is not None:
                raise ValueError("every and start_epoch counted epochs and are gone: checks are now in steps; "
                                 "use checks (checks per run) or every_steps (steps per interval)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AutoFreezeConfig:
        if self.every_steps is not None and self.checks != type(self).model_fields["checks"].default:
            raise ValueError("give checks or every_steps, not both (every_steps sets the interval itself)")
        # A changed option the criterion ignores is a mistake (the defaults are what dump_config writes).
        unused = {"percentile": "threshold", "threshold": "percentile"}
        for key, other in unused.items():
            if self.criterion == other and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key} applies only with criterion: {key} (criterion is {other})")
        return self

    def interval(self, total_steps: int) -> int:
        """Optimizer steps per interval for a run of ``total_steps``."""
        return self.every_steps if self.every_steps is not None else max(1, total_steps // self.checks)


class FreezeConfig(_Strict):
    """Which parameters train. At most one of ``trainable``, ``frozen`` or ``until``."""

    trainable: list[str] | None = None
    frozen: list[str] | None = None
    until: str | None = None
    batchnorm: Literal["frozen", "train"] = "frozen"
    schedule: list[UnfreezeStep] = Field(default_factory=list)
    auto: AutoFreezeConfig | None = None

    @field_validator("auto", mode="before")
    @classmethod
    def _auto_switch(cls, v):
        # ``auto: true`` means the defaults; ``auto: false`` (or null) means off.
        if v is True:
            return {}
        return None if v is False else v

    @field_validator("schedule")
    @classmethod
    def _increasing(cls, v: list[UnfreezeStep]) -> list[UnfreezeStep]:
        epochs = [s.epoch for s in v]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"schedule epochs must be strictly increasing (got {epochs})")
        return v

    @model_validator(mode="after")
    def _one_selector(self) -> FreezeConfig:
        given = [k for k in ("trainable", "frozen", "until") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of trainable, frozen, until (got {', '.join(given)})")
        if self.auto is not None and self.schedule:
            raise ValueError(
                "auto and schedule cannot be combined: adaptive freezing only grows the frozen prefix, "
                "a schedule unfreezes; use one of them"
            )
        for key in ("trainable", "frozen"):
            patterns = getattr(self, key)
            if patterns is not None and not patterns:
                raise ValueError(f"{key} is an empty list; omit it to train everything")
        return self


class LoraSpec(_Strict):
    """Low-rank adapters on convolutions (``adapt.method: lora``), made by Hugging Face peft."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # fnmatch patterns over convolution names (layer4.*.conv2); None: every convolution of the
    # stages the freeze selectors leave trainable.
    target: list[str] | None = Field(None, min_length=1)


class AdaptConfig(_Strict):
    """A small parameter set that trains while every other pretrained weight stays frozen.

    ``bn`` trains the affine parameters of every BatchNorm layer (Frankle et al., ICLR 2021), ``bias``
    every bias (BitFit), ``lora`` low-rank adapters beside the convolutions (Hu et al. 2022, through
    peft); the head always trains. The freeze selectors still apply on top: a stage they freeze
    keeps its BatchNorm parameters and biases frozen too, and gets no adapters.
    """

    method: Literal["none", "bn", "bias", "lora"] = "none"
    lora: LoraSpec = Field(default_factory=LoraSpec)

    @model_validator(mode="after")
    def _lora_needs_lora(self) -> AdaptConfig:
        # Against the defaults, not the keys given: a dumped config (a run's config.yaml) lists them all.
        if self.method != "lora" and self.lora != LoraSpec():
            raise ValueError(f"lora options apply only with method: lora (method is {self.method})")
        return self


class DataConfig(_Strict):
    """Where the images come from and how they are batched."""

    source: Literal["synthetic", "imagefolder", "cifar10"] = "synthetic"
    root: str | None = None
    download: bool = False
    image_size: int = Field(64, ge=16, le=1024)
    batch_size: int = Field(32, ge=1)
    # auto: decided from the source, the device and the CPUs (training.data.worker_count).
    num_workers: int | Literal["auto"] = "auto"
    train_size: int = Field(512, ge=1)
    val_size: int = Field(128, ge=0)
    augment: bool = False
    skip_bad_images: bool = False

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        # One message for both shapes (a union would report one error per member).
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("expected a number of worker processes (0 or more) or auto")

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required when data.source is {self.source!r}")
        return self


class ParamGroupRule(_Strict):
    """Discriminative learning rates: trainable parameters whose names match get ``lr * lr_mult``."""

    match: str | list[str]
    lr_mult: float = Field(1.0, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class OptimConfig(_Strict):
    """SGD with momentum; it only ever receives the trainable parameters."""

    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False
    param_groups: list[ParamGroupRule] = Field(default_factory=list)
    scheduler: Literal["none", "cosine", "step"] = "none"
    warmup_steps: int = Field(0, ge=0)
    step_size: int = Field(100, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_mult: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov requires momentum > 0")
        return self


class TrainConfig(_Strict):
    """Length of the run and what gets measured and saved."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    warmup_steps: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    stop_on_nonfinite: bool = True
    feature_cache: Literal["auto", "on", "off"] = "off"
    feature_cache_max_bytes: int = Field(2 * 2**30, ge=0)
    fold_batchnorm: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    # Convolutions with frozen weights keep no input for backward, ReLU keeps a 1-bit mask, max
    # pooling its indices only (models/lean.py). Same numbers bit for bit, less memory.
    lean_backward: bool = False
    threads: int | None = Field(None, ge=1)

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare on/off as a boolean; the user meant the word.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class OutputConfig(_Strict):
    """The run folder."""

    dir: str = "runs/run"
    overwrite: bool = False
    tensorboard: bool = False  # TensorBoard event files in <dir>/tensorboard/ (needs the tensorboard extra)


class Config(_Strict):
    """A complete, validated run configuration."""

    seed: int = 0
    device: str = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("device")
    @classmethod
    def _device_value(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise ValueError(f"{v!r} is not one of auto, cpu, cuda, cuda:N")
        return v

    @field_validator("adapt")
    @classmethod
    def _adapt_alone(cls, v: AdaptConfig, info: ValidationInfo) -> AdaptConfig:
        freeze = info.data.get("freeze")
        if v.method == "none" or freeze is None:
            return v
        if freeze.schedule:
            raise ValueError(f"method {v.method} cannot be combined with freeze.schedule: an unfreezing phase "
                             f"would train the weights that {v.method} keeps frozen")
        if freeze.auto is not None:
            raise ValueError(f"method {v.method} cannot be combined with freeze.auto: adaptive freezing measures "
                             "whole stages learning, and here only a sliver of each stage trains")
        return v

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain YAML-able data."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``; users don't)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``a.b=value`` on the first ``=`` and parses the value as YAML.

    Args:
        text: One override as typed on the command line.

    Returns:
        The dotted key as a list of parts, and the parsed value.

    Raises:
        ConfigError: If there is no ``=``, the key is empty or the value is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({first_line(e, limit=None)})") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict]:
    """Returns a copy of ``data`` with the overrides applied, and which key each came from."""
    data = copy.deepcopy(data)
    origin: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
        origin[".".join(parts)] = text
    return data, origin


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Reads any YAML document, turning every failure into one clear ConfigError line.

    Args:
        path: The file.
        what: What the file is, for the messages ("config", "arms file").
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: {what} file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what} ({e})") from e
    try:
        return _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e, limit=None)
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from e


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, turning every failure into one clear ConfigError line."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Loads, overrides and validates a config.

    Args:
        path: YAML file, or None to start from the defaults.
        overrides: ``dotted.key=value`` strings applied on top of the file.

    Returns:
        The validated Config.

    Raises:
        ConfigError: Listing every problem at once, each with its dotted key and source.
    """
    data = load_yaml(path) if path is not None else {}
    return validate_config(data, overrides or [], source=str(path) if path else "<defaults>")


def validate_config(data: dict[str, Any], overrides: list[str], source: str) -> Config:
    """Validates raw config data plus overrides; see :func:`load_config`.

    Two checks, reported together: the schema, then ``model.name`` against the model catalog.
    """
    merged, origin = apply_overrides(data, overrides)
    problems = _model_name_problems(merged, source, origin)
    try:
        config = Config.model_validate(merged)
    except ValidationError as e:
        problems = [_describe(err, source, origin) for err in e.errors()] + problems
    if problems:
        raise ConfigError(problems)
    return config


def _model_name_problems(merged: dict[str, Any], source: str, origin: dict[str, str]) -> list[str]:
    """``model.name`` must be a torchvision classification model (the schema checks that it is a string)."""
    model = merged.get("model")
    name = model.get("name", ModelConfig.model_fields["name"].default) if isinstance(model, dict) else None
    if not isinstance(name, str):
        return []
    # Imported here, not at the top: the catalog needs torchvision, and this module is kept
    # importable without torch (tools read configs without training anything).
    from freezetune.models.catalog import check_model_name

    try:
        check_model_name(name)
    except (ConfigError, MissingExtraError) as e:
        where = f"override {origin['model.name']!r}" if "model.name" in origin else source
        return [f"{where}: model.name: {e}"]
    return []


def dump_config(config: Config) -> str:
    """Returns the resolved config as YAML text."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _describe(err: dict, source: str, origin: dict[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    shown = key if all(p.isprintable() and p.strip() == p and p for p in loc) else repr(key)  # e.g. "\\x1e" or " seed"
    # A section-level problem (e.g. two freeze selectors) may come from an override inside it.
    hits = [text for k, text in origin.items() if k == key or k.startswith(key + ".")]
    where = ", ".join(f"override {t!r}" for t in hits) if hits else source
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _suggest(loc)
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "assertion_error", "missing"):
            msg += f" (got {err.get('input')!r})"
    return f"{where}: {shown}: {msg}"


def _suggest(loc: list[str]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    valid = ", ".join(model.model_fields)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {valid})"

