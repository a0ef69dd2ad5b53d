import pytest
import torch

from freezetune.config import FreezeConfig, OptimConfig, ParamGroupRule
from freezetune.freezing.plan import apply_freeze, unfreeze
from freezetune.training.optim import (
    add_unfrozen,
    build_optimizer,
    check_optimizer,
    lr_factor,
    param_matches,
    plain_optimizer,
    set_lr,
)


def test_param_matching():
    assert param_matches("layer4.0.conv1.weight", "layer4*")
    assert param_matches("layer4.0.conv1.weight", "layer4")
    assert not param_matches("layer40.weight", "layer4") and not param_matches("fc.weight", ["layer*"])


def test_discriminative_groups_first_match_wins(resnet18):
    apply_freeze(resnet18, FreezeConfig(trainable=["layer3", "layer4", "fc"]), "resnet18")
    cfg = OptimConfig(lr=0.1, param_groups=[ParamGroupRule(match="layer3*", lr_mult=0.01),
                                            ParamGroupRule(match=["layer*"], lr_mult=0.1, weight_decay=0.5)])
    opt = build_optimizer(resnet18, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"base/layer3*", "base/layer*", "base"}
    assert by_name["base/layer3*"]["lr"] == pytest.approx(0.001)
    assert by_name["base/layer*"]["lr"] == pytest.approx(0.01) and by_name["base/layer*"]["weight_decay"] == 0.5
    assert {id(p) for p in by_name["base"]["params"]} == {id(resnet18.fc.weight), id(resnet18.fc.bias)}
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in resnet18.parameters())


def test_schedules():
    cos = OptimConfig(scheduler="cosine", warmup_steps=4)
    assert [lr_factor(s, 20, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cos) == pytest.approx(1.0) and lr_factor(19, 20, cos) < 0.02
    step = OptimConfig(scheduler="step", step_size=5, gamma=0.5)
    assert [lr_factor(s, 20, step) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(7, 20, OptimConfig()) == 1.0


def test_set_lr_respects_group_multipliers(resnet18):
    apply_freeze(resnet18, FreezeConfig(trainable=["layer4", "fc"]), "resnet18")
    cfg = OptimConfig(lr=0.2, scheduler="step", step_size=1, gamma=0.5,
                      param_groups=[ParamGroupRule(match="layer4", lr_mult=0.1)])
    opt = build_optimizer(resnet18, cfg)
    set_lr(opt, cfg, 2, 10)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.005, 0.05])


def test_unfrozen_params_join_as_new_group_and_hygiene_holds(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(trainable=["fc"]), "resnet18")
    cfg = OptimConfig(lr=0.1)
    opt = build_optimizer(resnet18, cfg)
    newly = unfreeze(resnet18, plan, ["layer4"])
    assert len(newly) == 15 and all(p.requires_grad for _, p in newly)
    assert "layer4.0.bn1" not in plan.frozen_bn and "layer3.0.bn1" in plan.frozen_bn
    assert add_unfrozen(opt, newly, cfg, 0.5, "unfreeze@2") == ["unfreeze@2"]
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.05)
    check_optimizer(opt, resnet18)
    resnet18.layer4[0].conv1.weight.requires_grad_(False)  # a frozen tensor left in a group is caught
    with pytest.raises(AssertionError, match="layer4.0.conv1.weight"):
        check_optimizer(opt, resnet18)


def test_optimizer_is_fused_where_torch_supports_it(resnet18):
    opt = build_optimizer(resnet18, OptimConfig())
    assert opt.defaults["fused"] is True  # this torch has fused SGD for CPU


def test_optimizer_falls_back_when_fused_is_unsupported(resnet18, monkeypatch):
    real = torch.optim.SGD

    def no_fused(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", no_fused)
    opt = build_optimizer(resnet18, OptimConfig(momentum=0.9))
    assert not opt.defaults.get("fused") and opt.defaults["momentum"] == 0.9


def test_plain_optimizer_takes_every_parameter_as_a_plain_loop_does(resnet18):
    apply_freeze(resnet18, FreezeConfig(trainable=["fc"]), "resnet18")
    opt = plain_optimizer(resnet18, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(resnet18.parameters()))
    assert not opt.defaults.get("fused")
    with pytest.raises(AssertionError, match="frozen parameter"):
        check_optimizer(opt, resnet18)  # exactly what freezetune's own optimizer never allows
