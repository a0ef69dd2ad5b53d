import pytest
import torch
import torchvision
from torch import nn

from freezetune.config import FreezeConfig, ModelConfig
from freezetune.errors import FreezeError
from freezetune.freezing.plan import (
    apply_freeze,
    fingerprint,
    match_modules,
    modules_until,
    preview,
    set_train_mode,
    tensor_sha256,
    trainable_parameters,
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def trainable_tops(model):
    return sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})


def test_trainable_patterns_cover_children(model):
    plan = apply_freeze(model, FreezeConfig(trainable=["layer4", "fc"]), "resnet18")
    assert trainable_tops(model) == ["fc", "layer4"]
    assert model.layer4[0].conv1.weight.requires_grad and not model.layer3[1].conv2.weight.requires_grad
    assert set(plan.trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(plan.trainable) + len(plan.frozen) == len(list(model.parameters()))


def test_frozen_patterns_and_globs(model):
    apply_freeze(model, FreezeConfig(frozen=["conv1", "bn1", "layer[12]", "layer3.0.*"]), "resnet18")
    assert not model.layer2[1].bn2.weight.requires_grad
    assert not model.layer3[0].downsample[0].weight.requires_grad
    assert model.layer3[1].conv1.weight.requires_grad and model.fc.weight.requires_grad


def test_nested_trainable_pattern_keeps_siblings_frozen(model):
    apply_freeze(model, FreezeConfig(trainable=["layer4.1.conv2", "fc"]), "resnet18")
    assert model.layer4[1].conv2.weight.requires_grad
    assert not model.layer4[1].conv1.weight.requires_grad and not model.layer4[1].bn2.weight.requires_grad


@pytest.mark.parametrize("stage,last_frozen,first_trainable", [
    ("stem", "bn1", "layer1"), ("layer1", "layer1", "layer2"), ("layer3", "layer3", "layer4"),
    ("layer4", "layer4", "fc"),
])
def test_until(model, stage, last_frozen, first_trainable):
    apply_freeze(model, FreezeConfig(until=stage), "resnet18")
    assert not any(p.requires_grad for p in getattr(model, last_frozen).parameters())
    assert all(p.requires_grad for p in getattr(model, first_trainable).parameters())
    assert model.fc.weight.requires_grad


def test_until_rejects_unknown_stage():
    with pytest.raises(FreezeError, match="layer3"):
        modules_until("resnet18", "layer9")


def test_pattern_matching_nothing_lists_valid_names(model):
    with pytest.raises(FreezeError, match=r"'layr4' matches no module.*layer4"):
        match_modules(model, ["layr4"])


def test_freezing_everything_is_an_error(model):
    with pytest.raises(FreezeError, match="nothing to train"):
        apply_freeze(model, FreezeConfig(frozen=["*"]), "resnet18")


def test_no_spec_trains_everything(model):
    plan = apply_freeze(model, FreezeConfig(), "resnet18")
    assert not plan.frozen and not plan.frozen_bn


def test_frozen_batchnorm_stays_in_eval_mode(model):
    plan = apply_freeze(model, FreezeConfig(trainable=["layer4", "fc"]), "resnet18")
    set_train_mode(model, plan, True)
    assert not model.bn1.training and not model.layer3[1].bn2.training
    assert model.layer4[0].bn1.training and model.training
    assert len(plan.frozen_bn) == 1 + 4 * 2 + 2 * 3  # bn1, layer1..3 (2 blocks x 2 BN, + downsample)


def test_batchnorm_train_policy_keeps_bn_training(model):
    plan = apply_freeze(model, FreezeConfig(trainable=["fc"], batchnorm="train"), "resnet18")
    set_train_mode(model, plan, True)
    assert plan.frozen_bn == [] and model.bn1.training


def test_frozen_bn_statistics_unchanged_by_forward(model):
    plan = apply_freeze(model, FreezeConfig(trainable=["fc"]), "resnet18")
    before = fingerprint(model, plan)
    set_train_mode(model, plan, True)
    model(torch.randn(4, 3, 32, 32))
    assert fingerprint(model, plan) == before
    assert any(k.endswith("running_mean") for k in before)


def test_optimizer_only_sees_trainable(model):
    apply_freeze(model, FreezeConfig(trainable=["fc"]), "resnet18")
    params = trainable_parameters(model)
    assert {id(p) for p in params} == {id(model.fc.weight), id(model.fc.bias)}


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
