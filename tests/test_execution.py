"""The execution decision is one pure function: a table of facts and settings in, choices out."""

from __future__ import annotations

import pytest

from freezetune.config import TrainConfig
from freezetune.errors import ConfigError
from freezetune.speed.execution import ExecutionFacts, decide, plan_execution

PREFIX = ("stem", "layer1", "layer2", "layer3")


def facts(prefix=PREFIX, bn_frozen=True, model="resnet18", device="cpu", distributed=False, share=None):
    return ExecutionFacts(model, tuple(prefix), bn_frozen, device, distributed, share)


def train(**kw):
    return TrainConfig(**kw)


# (facts, train settings, augment) -> (split, fold, prefix channels-last, cache)
TABLE = [
    (facts(), {}, False, (True, True, True, False)),
    (facts(device="cuda"), {}, False, (True, True, False, False)),
    (facts(device="cuda"), {"channels_last": True}, False, (True, True, True, False)),
    (facts(bn_frozen=False), {}, False, (True, False, True, False)),  # unfolded, still channels-last on CPU
    (facts(bn_frozen=False, device="cuda"), {}, False, (True, False, False, False)),
    (facts(), {"fold_batchnorm": False}, False, (False, False, False, False)),
    (facts(), {"fold_batchnorm": False, "feature_cache": "auto"}, False, (True, False, True, True)),
    (facts(), {"feature_cache": "auto"}, True, (True, True, True, False)),  # augmentation: no cache
    (facts(prefix=()), {"feature_cache": "auto"}, False, (False, False, False, False)),
    (facts(prefix=(), model="mobilenet_v3_small"), {"feature_cache": "auto"}, False, (False, False, False, False)),
    # The cost model: auto leaves a cache off where the prefix is too small a share of the step.
    (facts(prefix=("stem",), share=0.023), {"feature_cache": "auto"}, False, (True, True, True, False)),
    (facts(prefix=("stem", "layer1"), share=0.138), {"feature_cache": "auto"}, False, (True, True, True, True)),
    (facts(prefix=("stem",), share=0.023), {"feature_cache": "on"}, False, (True, True, True, True)),  # forced
    (facts(prefix=("stem",), share=None), {"feature_cache": "auto"}, False, (True, True, True, True)),  # not judged
    # Each rank is dealt other samples every epoch; the ranks share their parts after the first.
    (facts(distributed=True), {"feature_cache": "auto"}, False, (True, True, True, True)),
]


@pytest.mark.parametrize(("f", "settings", "augment", "expected"), TABLE)
def test_decision_table(f, settings, augment, expected):
    plan = decide(f, train(**settings), augment)
    got = (plan.prefix_without_autograd.enabled, plan.fold_batchnorm.enabled,
           plan.prefix_channels_last.enabled, plan.feature_cache.enabled)
    assert got == expected
    assert all(line.split(": ", 1)[1] for line in plan.lines())  # every choice says why


def test_every_choice_has_a_reason_naming_its_cause():
    plan = decide(facts(prefix=(), model="vit_b_16"), train(), False)
    assert "ResNets only" in plan.prefix_without_autograd.reason
    plan = decide(facts(bn_frozen=False), train(feature_cache="auto"), False)
    assert "freeze.batchnorm: train" in plan.fold_batchnorm.reason
    assert "statistics" in plan.feature_cache.reason
    assert decide(facts(distributed=True), train(), False).ddp.enabled


def test_a_cache_left_off_for_its_cost_says_so():
    reason = decide(facts(prefix=("stem",), share=0.023), train(feature_cache="auto"), False).feature_cache.reason
    assert "only 2.3% of a step's FLOPs" in reason and "feature_cache: on forces it" in reason


@pytest.mark.parametrize(("until", "cached"), [("stem", False), ("layer1", True), ("layer3", True), ("layer4", True)])
def test_auto_counts_the_prefix_share_on_the_real_model(tiny, until, cached):
    """ResNet18: the stem is 2.3% of a frozen step's FLOPs, stem+layer1 13.8% (any image size)."""
    from freezetune.freezing.plan import apply_freeze
    from freezetune.models.weights import build_model

    cfg = tiny(freeze__until=until, freeze__trainable="null", train__feature_cache="auto")
    model = build_model(cfg.model).model
    plan = plan_execution(model, apply_freeze(model, cfg.freeze, cfg.model.name), cfg)
    assert plan.feature_cache.enabled is cached
    judged = plan_execution(model, apply_freeze(model, cfg.freeze, cfg.model.name), cfg, judge_cost=False)
    assert judged.feature_cache.enabled  # correctness alone allows it everywhere here


def test_cache_on_where_it_would_be_wrong_is_a_config_error():
    with pytest.raises(ConfigError, match="data.augment"):
        decide(facts(), train(feature_cache="on"), True)



def test_under_torchrun_the_cache_is_shared_by_the_ranks():
    plan = decide(facts(distributed=True), train(feature_cache="on"), False)
    assert plan.feature_cache.enabled and "shared by every rank after the first epoch" in plan.feature_cache.reason


def test_plan_execution_reads_the_facts_off_the_model(tiny):
    from freezetune.freezing.plan import apply_freeze
    from freezetune.models.weights import build_model

    cfg = tiny(freeze__until="layer2", freeze__trainable="null")
    model = build_model(cfg.model).model
    plan = plan_execution(model, apply_freeze(model, cfg.freeze, cfg.model.name), cfg)
    assert plan.frozen_prefix == ("stem", "layer1", "layer2")
    assert plan.as_dict()["prefix_without_autograd"] and plan.as_dict()["folded_batchnorm"]
