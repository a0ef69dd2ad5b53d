import pytest
import torch
from torch import nn

from freezetune.config import AdaptConfig, FreezeConfig, ModelConfig
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


# adapt.method: every pretrained weight frozen, a sliver of every stage trains


def test_bn_method_trains_batchnorm_affine_and_the_head_only(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(), "resnet18", AdaptConfig(method="bn"))
    bn = {n for n, m in resnet18.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert plan.adapt == "bn"
    assert set(plan.trainable) == {f"{b}.{p}" for b in bn for p in ("weight", "bias")} | {"fc.weight", "fc.bias"}
    assert all(not p.requires_grad for n, p in resnet18.named_parameters() if ".conv" in n or n == "conv1.weight")
    # A BatchNorm layer that trains is in training mode: its running statistics follow the new data.
    set_train_mode(resnet18, plan, True)
    assert plan.frozen_bn == [] and resnet18.layer2[0].bn1.training


def test_bias_method_trains_biases_and_the_head_only(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(), "resnet18", AdaptConfig(method="bias"))
    # torchvision's ResNet convolutions have no bias: BatchNorm's beta, and the head.
    assert all(n.endswith(".bias") or n == "fc.weight" for n in plan.trainable)
    assert "bn1.bias" in plan.trainable and "bn1.weight" in plan.frozen and "fc.weight" in plan.trainable
    assert plan.frozen_bn == []  # each BatchNorm has a trainable beta


def test_an_adapt_method_narrows_what_the_freeze_spec_leaves(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(until="layer2"), "resnet18", AdaptConfig(method="bn"))
    assert trainable_tops(resnet18) == ["fc", "layer3", "layer4"]
    assert "layer2.1.bn2.weight" in plan.frozen and "layer3.0.bn1.weight" in plan.trainable
    assert "layer3.0.conv1.weight" in plan.frozen
    # The stages the spec froze keep frozen, statistics-frozen BatchNorm: a prefix as before.
    assert "layer2.1.bn2" in plan.frozen_bn and "layer3.0.bn1" not in plan.frozen_bn


def test_none_changes_nothing(resnet18):
    plan = apply_freeze(resnet18, FreezeConfig(until="layer1"), "resnet18", AdaptConfig())
    assert plan.adapt == "none" and trainable_tops(resnet18) == ["fc", "layer2", "layer3", "layer4"]


def test_a_method_with_nothing_to_train_is_one_line():
    # ConvNeXt normalises with LayerNorm: no BatchNorm to train (a meta model: no memory, no init).
    with pytest.raises(FreezeError) as err:
        preview(ModelConfig(name="convnext_tiny", weights="none"), FreezeConfig(), AdaptConfig(method="bn"))
    line = str(err.value)
    assert "\n" not in line and "adapt.method: bn" in line and "convnext_tiny" in line
    with pytest.raises(FreezeError, match="outside the head and the frozen layers"):
        preview(ModelConfig(weights="none"), FreezeConfig(until="layer4"), AdaptConfig(method="bias"))


@pytest.mark.parametrize(("point", "frozen", "trains"), [
    ("layer2.0", ["conv1", "layer1.1", "layer2.0"], ["layer2.1", "layer3", "fc"]),
    ("layer1.0", ["bn1", "layer1.0"], ["layer1.1", "layer2"]),
    ("layer4.1", ["layer4.1"], ["fc"]),
])
def test_until_a_block_freezes_that_block_and_everything_before_it(resnet18, point, frozen, trains):
    apply_freeze(resnet18, FreezeConfig(until=point), "resnet18")
    assert not any(p.requires_grad for m in frozen for p in resnet18.get_submodule(m).parameters())
    assert all(p.requires_grad for m in trains for p in resnet18.get_submodule(m).parameters())


def test_until_a_block_that_does_not_exist_names_the_blocks_there_are():
    with pytest.raises(FreezeError, match=r"'layer2.2' is not a freeze point of resnet18; did you mean 'layer2.1'\? "
                                          r"use one of stem, layer1, layer2, layer3, layer4, or a block: layer1.0 .. "
                                          r"layer4.1"):
        modules_until("resnet18", "layer2.2")
    assert modules_until("resnet50", "layer3.5")[-2:] == ("layer3.4", "layer3.5")
