import pytest
import torch
from torch import nn

from freezetune.config import FreezeConfig, ModelConfig
from freezetune.errors import FreezeError
from freezetune.freezing.integrity import fingerprint, tensor_sha256
from freezetune.freezing.plan import (
    apply_freeze,
    match_modules,
    modules_until,
    preview,
    set_train_mode,
    trainable_parameters,
)


def trainable_tops(model):
    return sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})


def test_trainable_patterns_cover_children(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(trainable=["layer4", "fc"]), "resnet18")
    assert trainable_tops(resnet18) == ["fc", "layer4"]
    assert resnet18.layer4[0].conv1.weight.requires_grad and not resnet18.layer3[1].conv2.weight.requires_grad
    assert set(plan.trainable) == {n for n, p in resnet18.named_parameters() if p.requires_grad}
    assert len(plan.trainable) + len(plan.frozen) == len(list(resnet18.parameters()))


def test_frozen_patterns_and_globs(resnet18):
    apply_freeze(resnet18, FreezeConfig(frozen=["conv1", "bn1", "layer[12]", "layer3.0.*"]), "resnet18")
    assert not resnet18.layer2[1].bn2.weight.requires_grad
    assert not resnet18.layer3[0].downsample[0].weight.requires_grad
    assert resnet18.layer3[1].conv1.weight.requires_grad and resnet18.fc.weight.requires_grad


def test_nested_trainable_pattern_keeps_siblings_frozen(resnet18):
    apply_freeze(resnet18, FreezeConfig(trainable=["layer4.1.conv2", "fc"]), "resnet18")
    assert resnet18.layer4[1].conv2.weight.requires_grad
    assert not resnet18.layer4[1].conv1.weight.requires_grad and not resnet18.layer4[1].bn2.weight.requires_grad


@pytest.mark.parametrize("stage,last_frozen,first_trainable", [
    ("stem", "bn1", "layer1"), ("layer1", "layer1", "layer2"), ("layer3", "layer3", "layer4"),
    ("layer4", "layer4", "fc"),
])
def test_until(resnet18, stage, last_frozen, first_trainable):
    apply_freeze(resnet18, FreezeConfig(until=stage), "resnet18")
    assert not any(p.requires_grad for p in getattr(resnet18, last_frozen).parameters())
    assert all(p.requires_grad for p in getattr(resnet18, first_trainable).parameters())
    assert resnet18.fc.weight.requires_grad


def test_until_rejects_unknown_stage():
    with pytest.raises(FreezeError, match="layer3"):
        modules_until("resnet18", "layer9")


def test_pattern_matching_nothing_lists_valid_names(resnet18):
    with pytest.raises(FreezeError, match=r"'layr4' matches no module.*layer4"):
        match_modules(resnet18, ["layr4"])


def test_freezing_everything_is_an_error(resnet18):
    with pytest.raises(FreezeError, match="nothing to train"):
        apply_freeze(resnet18, FreezeConfig(frozen=["*"]), "resnet18")


def test_no_spec_trains_everything(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(), "resnet18")
    assert not plan.frozen and not plan.frozen_bn


def test_frozen_batchnorm_stays_in_eval_mode(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(trainable=["layer4", "fc"]), "resnet18")
    set_train_mode(resnet18, plan, True)
    assert not resnet18.bn1.training and not resnet18.layer3[1].bn2.training
    assert resnet18.layer4[0].bn1.training and resnet18.training
    assert len(plan.frozen_bn) == 1 + 4 * 2 + 2 * 3  # bn1, layer1..3 (2 blocks x 2 BN, + downsample)


def test_batchnorm_train_policy_keeps_bn_training(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(trainable=["fc"], batchnorm="train"), "resnet18")
    set_train_mode(resnet18, plan, True)
    assert plan.frozen_bn == [] and resnet18.bn1.training


def test_frozen_bn_statistics_unchanged_by_forward(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(trainable=["fc"]), "resnet18")
    before = fingerprint(resnet18, plan)
    set_train_mode(resnet18, plan, True)
    resnet18(torch.randn(4, 3, 32, 32))
    assert fingerprint(resnet18, plan) == before
    assert any(k.endswith("running_mean") for k in before)


def test_optimizer_only_sees_trainable(resnet18):
    apply_freeze(resnet18, FreezeConfig(trainable=["fc"]), "resnet18")
    params = trainable_parameters(resnet18)
    assert {id(p) for p in params} == {id(resnet18.fc.weight), id(resnet18.fc.bias)}


def test_tensor_hash_is_exact_across_dtypes():
    t = torch.arange(6, dtype=torch.float32)
    assert tensor_sha256(t) == tensor_sha256(t.clone())
    bumped = t.clone()
    bumped[3] = torch.nextafter(bumped[3], torch.tensor(10.0))
    assert tensor_sha256(bumped) != tensor_sha256(t)
    assert tensor_sha256(t.to(torch.bfloat16)) and tensor_sha256(torch.tensor(3))


def test_preview_needs_no_weights():
    model, plan = preview(ModelConfig(weights="imagenet"), FreezeConfig(trainable=["fc"]))
    assert isinstance(model, nn.Module) and plan.trainable == ["fc.weight", "fc.bias"]
