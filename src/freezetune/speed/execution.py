"""Which execution path a run takes: one pure decision, with the reason for every choice.

:func:`decide` turns facts about the model's freeze state (which leading stages are frozen, whether
their BatchNorm is frozen, the device) and the ``train``/``data`` config into an
:class:`ExecutionPlan`. It reads no tensors and builds nothing, so it is tested as a table.
:func:`plan_execution` gathers the facts from a real model and calls it. Training (at setup and
after every unfreeze phase), ``compare`` (which cached arms are possible) and ``inspect`` all use
this one decision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from freezetune.config import Config, TrainConfig
from freezetune.errors import ConfigError
from freezetune.freezing.plan import FreezePlan
from freezetune.speed.prefix import cached_share, frozen_prefix, prefix_batchnorm_frozen, supports_prefix

# train.feature_cache: auto caches only a prefix whose forward is at least this share of a step's
# FLOPs. A cached step reads the prefix's output instead of computing it; below this share there
# is little to save, and reading features can cost more than it saves. Measured on 2 CPU cores,
# ResNet18, 32 px, batch 32: frozen through the stem (2.3% of the FLOPs), the cache bought between
# -13% (0.95x vs 1.09x of full) and +2% (1.07x vs 1.05x), i.e. noise or a loss; through layer1
# (13.8%), 1.25x vs 1.16x. See docs/guide.md, "Faster frozen steps".
MIN_CACHE_SHARE = 0.05


@dataclass(frozen=True)
class Choice:
    """One decision: on or off, and why."""

    enabled: bool
    reason: str


@dataclass(frozen=True)
class ExecutionFacts:
    """What the decision depends on, gathered from the model (see :func:`gather_facts`).

    Attributes:
        model_name: The torchvision model name.
        frozen_prefix: The leading stages whose parameters are all frozen ([] where the model
            family has no frozen-prefix implementation).
        prefix_batchnorm_frozen: Whether every BatchNorm in that prefix is in eval mode.
        device_type: ``cpu`` or ``cuda``.
        distributed: Whether the run is one of several torchrun processes.
        prefix_forward_share: The prefix's forward FLOPs as a share of a training step's, or None
            when not counted (then the cost of caching is not judged).
    """

    model_name: str
    frozen_prefix: tuple[str, ...]
    prefix_batchnorm_frozen: bool
    device_type: str = "cpu"
    distributed: bool = False
    prefix_forward_share: float | None = None


@dataclass(frozen=True)
class ExecutionPlan:
    """How every training step runs; each field carries its reason."""

    frozen_prefix: tuple[str, ...]
    prefix_without_autograd: Choice
    fold_batchnorm: Choice
    prefix_channels_last: Choice
    feature_cache: Choice
    channels_last: Choice
    compile: Choice
    ddp: Choice
    precision: str

    def as_dict(self) -> dict:
        """The ``speed`` section of ``summary.json`` (keys kept from before this record existed)."""
        return {
            "frozen_prefix": list(self.frozen_prefix),
            "prefix_without_autograd": self.prefix_without_autograd.enabled,
            "folded_batchnorm": self.fold_batchnorm.enabled,
            "prefix_channels_last": self.prefix_channels_last.enabled,
            "feature_cache": {"enabled": self.feature_cache.enabled, "reason": self.feature_cache.reason},
            "precision": self.precision,
            "channels_last": self.channels_last.enabled,
            "compile": self.compile.enabled,
            "ddp": self.ddp.enabled,
            "reasons": {name: choice.reason for name, choice in self._choices().items()},
        }

    def _choices(self) -> dict[str, Choice]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, Choice)}

    def lines(self) -> list[str]:
        """One line per choice, for people: ``prefix_without_autograd: on (stem..layer3 is frozen)``."""
        return [f"{name}: {'on' if c.enabled else 'off'} ({c.reason})" for name, c in self._choices().items()]


def decide(facts: ExecutionFacts, train: TrainConfig, augment: bool) -> ExecutionPlan:
    """The execution path for these facts and settings. Pure: no tensors, no side effects.

    Args:
        facts: The model's freeze state and the device.
        train: The ``train`` config section (feature_cache, fold_batchnorm, precision, layout, compile).
        augment: ``data.augment``: random transforms make cached prefix outputs wrong.

    Returns:
        The plan.

    Raises:
        ConfigError: With ``train.feature_cache: on``, naming why caching would be incorrect.
    """
    prefix = facts.frozen_prefix
    span = f"{prefix[0]}..{prefix[-1]}" if prefix else ""
    cache = _cache_choice(facts, train.feature_cache, augment)
    split = bool(prefix) and (train.fold_batchnorm or cache.enabled)
    why_split = _why_no_prefix(facts) or (
        f"{span} is frozen: it runs under no_grad, building no autograd graph" if split
        else "train.fold_batchnorm is off and there is no feature cache")
    fold = split and facts.prefix_batchnorm_frozen and train.fold_batchnorm
    if fold:
        why_fold = ("the prefix's BatchNorm is frozen: folded into its convolutions (a private copy of "
                    "their weights; train.fold_batchnorm: false saves that memory)")
    elif split and not facts.prefix_batchnorm_frozen:
        why_fold = "BatchNorm in the prefix updates its statistics (freeze.batchnorm: train)"
    else:
        why_fold = "no prefix to fold" if not split else "train.fold_batchnorm is off"
    # Measured on CPU: the prefix runs 1.1-5.7x faster channels-last (see SplitForward), folded or
    # not; on CUDA it follows train.channels_last like the rest of the model.
    prefix_cl = split and (facts.device_type == "cpu" or train.channels_last)
    why_prefix_cl = ("the prefix runs channels-last (faster on CPU, or train.channels_last)"
                     if prefix_cl else "no prefix, or CUDA without train.channels_last")
    return ExecutionPlan(
        frozen_prefix=prefix,
        prefix_without_autograd=Choice(split, why_split),
        fold_batchnorm=Choice(fold, why_fold),
        prefix_channels_last=Choice(prefix_cl, why_prefix_cl),
        feature_cache=cache,
        channels_last=Choice(train.channels_last, f"train.channels_last is {_onoff(train.channels_last)}"),
        compile=Choice(train.compile, f"train.compile is {_onoff(train.compile)}"),
        ddp=Choice(facts.distributed, "torchrun started several processes" if facts.distributed
                   else "a single process"),
        precision=train.precision,
    )


def _cache_choice(facts: ExecutionFacts, mode: str, augment: bool) -> Choice:
    if mode == "off":
        return Choice(False, "train.feature_cache is off")
    prefix = facts.frozen_prefix
    why_not = (
        _why_no_prefix(facts)
        or ("BatchNorm in the frozen prefix updates its statistics (freeze.batchnorm: train)"
            if not facts.prefix_batchnorm_frozen else None)
        or ("data.augment is on: random transforms change the prefix output every epoch" if augment else None)
    )
    if why_not and mode == "on":
        raise ConfigError(f"train.feature_cache: on is not possible: {why_not}")
    if why_not:
        return Choice(False, f"feature cache off: {why_not}")
    share = facts.prefix_forward_share
    if mode == "auto" and share is not None and share < MIN_CACHE_SHARE:
        return Choice(False, f"feature cache off: {', '.join(prefix)} is only {share:.1%} of a step's FLOPs, too "
                             f"little to save for reading cached features (auto caches from {MIN_CACHE_SHARE:.0%}; "
                             "train.feature_cache: on forces it)")
    saves = f", {share:.0%} of a step's FLOPs" if share is not None else ""
    # Under torchrun each rank is dealt other samples every epoch (EpochSampler): after the
    # filling epoch the ranks exchange their shares (distributed.share_cache), so each holds it all.
    shared = ", shared by every rank after the first epoch" if facts.distributed else ""
    return Choice(True, f"feature cache on: caching the output of {', '.join(prefix)} once per sample{saves}{shared}")


def _why_no_prefix(facts: ExecutionFacts) -> str | None:
    """Why there is no frozen prefix to run without autograd or cache, or None if there is one."""
    if not supports_prefix(facts.model_name):
        return f"frozen-prefix execution is implemented for ResNets only (model.name is {facts.model_name})"
    if not facts.frozen_prefix:
        return "no frozen prefix: the first stage (stem) trains"
    return None


def decide_cache(config: Config, prefix: list[str], prefix_bn_frozen: bool) -> Choice:
    """Only the feature-cache part of :func:`decide`, for a given prefix (``train.feature_cache``).

    Raises:
        ConfigError: With ``on``, naming the condition that makes caching incorrect.
    """
    facts = ExecutionFacts(config.model.name, tuple(prefix), prefix_bn_frozen)
    return _cache_choice(facts, config.train.feature_cache, config.data.augment)


def gather_facts(model: nn.Module, plan: FreezePlan, model_name: str, device: torch.device | str = "cpu",
                 distributed: bool = False) -> ExecutionFacts:
    """Reads the model's freeze state: its frozen prefix and whether that prefix's BatchNorm is frozen."""
    prefix = frozen_prefix(model, model_name)
    return ExecutionFacts(
        model_name=model_name,
        frozen_prefix=tuple(prefix),
        prefix_batchnorm_frozen=prefix_batchnorm_frozen(model, model_name, prefix, plan),
        device_type=torch.device(device).type,
        distributed=distributed,
    )


def plan_execution(model: nn.Module, plan: FreezePlan, config: Config, device: torch.device | str = "cpu",
                   distributed: bool = False, judge_cost: bool = True) -> ExecutionPlan:
    """:func:`decide` on the facts of this model and freeze plan.

    Args:
        model: The model, its freeze state applied.
        plan: Its freeze plan.
        config: The run's config.
        device: Where it trains.
        distributed: Whether it is one of several torchrun processes.
        judge_cost: With ``train.feature_cache: auto``, count the prefix's share of a step's FLOPs
            so that a cache that would not pay is left off (False: judge correctness only).

    Raises:
        ConfigError: With ``train.feature_cache: on``, naming why caching would be incorrect.
    """
    facts = gather_facts(model, plan, config.model.name, device, distributed)
    # frozen_prefix is empty for models without a frozen-prefix implementation.
    if judge_cost and config.train.feature_cache == "auto" and facts.frozen_prefix:
        share = prefix_forward_share(model, config.model.name, list(facts.frozen_prefix), config.data.image_size)
        facts = replace(facts, prefix_forward_share=share)
    return decide(facts, config.train, config.data.augment)


def prefix_forward_share(model: nn.Module, model_name: str, prefix: list[str], image_size: int) -> float:
    """The prefix's forward FLOPs as a share of one training step's (counted on a meta copy, batch 2)."""
    return cached_share(model, model_name, prefix, 2, image_size)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"
