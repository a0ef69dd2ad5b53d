import pytest
import torch
import torchvision
from torch import nn

from freezetune.config import FreezeConfig
from freezetune.freezing.integrity import fingerprint
from freezetune.freezing.plan import apply_freeze, set_train_mode
from freezetune.speed.prefix import SplitForward, fold_batchnorm, frozen_prefix, prefix_batchnorm_frozen


def model_with_real_bn_stats(seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=10)
    for mod in m.modules():  # fresh BN is the identity map; make folding do real work
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("spec,prefix", [
    (FreezeConfig(trainable=["fc"]), ["stem", "layer1", "layer2", "layer3", "layer4"]),
    (FreezeConfig(until="layer2"), ["stem", "layer1", "layer2"]),
    (FreezeConfig(frozen=["layer2"]), []),  # stem trains: no prefix
    (FreezeConfig(), []),
])
def test_frozen_prefix(resnet18, spec, prefix):
    apply_freeze(resnet18, spec, "resnet18")
    assert frozen_prefix(resnet18, "resnet18") == prefix


def test_folding_is_numerically_equivalent_and_removes_batchnorm():
    m = model_with_real_bn_stats().eval()
    folded = fold_batchnorm(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in folded.modules())
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(folded(x), m(x), rtol=1e-4, atol=1e-4)


def test_split_forward_matches_model_and_trains_the_suffix_only():
    m = model_with_real_bn_stats()
    plan = apply_freeze(m, FreezeConfig(trainable=["layer4", "fc"]), "resnet18")
    set_train_mode(m, plan)
    prefix = frozen_prefix(m, "resnet18")
    assert prefix_batchnorm_frozen(m, "resnet18", prefix, plan)
    split = SplitForward(m, "resnet18", prefix, fold=True)
    before = fingerprint(m, plan)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    out = split(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert m.layer4[0].conv1.weight.grad is not None and m.layer3[0].conv1.weight.grad is None
    assert fingerprint(m, plan) == before


def test_batchnorm_train_policy_is_not_folded():
    m = model_with_real_bn_stats()
    plan = apply_freeze(m, FreezeConfig(trainable=["fc"], batchnorm="train"), "resnet18")
    prefix = frozen_prefix(m, "resnet18")
    assert not prefix_batchnorm_frozen(m, "resnet18", prefix, plan)


def test_frozen_batchnorm_after_trainable_layer_still_passes_gradients():
    # layer3 trains, layer4 (with its BatchNorm) is frozen: not a prefix, so it runs as usual in
    # eval mode and gradients flow through it to layer3.
    m = model_with_real_bn_stats()
    plan = apply_freeze(m, FreezeConfig(frozen=["conv1", "bn1", "layer1", "layer2", "layer4"]), "resnet18")
    set_train_mode(m, plan)
    assert frozen_prefix(m, "resnet18") == ["stem", "layer1", "layer2"]
    split = SplitForward(m, "resnet18", frozen_prefix(m, "resnet18"), fold=True)
    split(torch.randn(2, 3, 64, 64)).sum().backward()
    assert m.layer3[0].conv1.weight.grad is not None and m.layer4[0].conv1.weight.grad is None
    assert not m.layer4[0].bn1.training


def test_channels_last_prefix_matches_and_leaves_the_model_layout_alone():
    m = model_with_real_bn_stats()
    plan = apply_freeze(m, FreezeConfig(until="layer2"), "resnet18")
    set_train_mode(m, plan)
    prefix = frozen_prefix(m, "resnet18")
    nchw = SplitForward(m, "resnet18", prefix, fold=True)
    nhwc = SplitForward(m, "resnet18", prefix, fold=True, prefix_channels_last=True)
    x = torch.randn(4, 3, 64, 64)
    h = nhwc.features(x)
    torch.testing.assert_close(h, nchw.features(x), rtol=1e-4, atol=1e-4)
    assert h.is_contiguous()  # handed to the suffix in its own (NCHW) layout
    assert next(iter(nhwc.prefix.parameters())).is_contiguous(memory_format=torch.channels_last)
    assert m.conv1.weight.is_contiguous()  # only the private folded copy was converted


def test_an_unfolded_prefix_runs_channels_last_without_touching_the_model():
    m = model_with_real_bn_stats()
    plan = apply_freeze(m, FreezeConfig(until="layer1", batchnorm="train"), "resnet18")
    split = SplitForward(m, "resnet18", frozen_prefix(m, "resnet18"), fold=False, prefix_channels_last=True)
    plain = SplitForward(m, "resnet18", frozen_prefix(m, "resnet18"), fold=False)
    assert split.prefix_format is torch.channels_last and plan.frozen_bn == []
    assert split.folded_bytes == 0  # no copy: the model's own modules
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(split.features(x), plain.features(x), rtol=1e-4, atol=1e-4)
    assert m.conv1.weight.is_contiguous()


def test_folding_copies_only_the_fused_weights():
    m = model_with_real_bn_stats().eval()
    split = SplitForward(m, "resnet18", ["stem", "layer1", "layer2"], fold=True, prefix_channels_last=True)
    convs = sum(p.numel() * 4 for n, p in m.named_parameters()
                if n.split(".")[0] in ("conv1", "layer1", "layer2") and p.dim() == 4)
    out_channels = sum(mod.out_channels * 4 for name, mod in m.named_modules()
                       if isinstance(mod, torch.nn.Conv2d) and name.split(".")[0] in ("conv1", "layer1", "layer2"))
    assert split.folded_bytes == convs + out_channels  # weights and one bias per output channel
    original = {id(t) for t in m.parameters()}
    assert not any(id(t) in original for t in split.prefix.parameters())


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_longer_prefix_continues_from_a_shorter_ones_output_bit_for_bit(channels_last):
    m = model_with_real_bn_stats()
    apply_freeze(m, FreezeConfig(until="layer2"), "resnet18")
    m.eval()
    short = SplitForward(m, "resnet18", ["stem"], fold=True, prefix_channels_last=channels_last)
    long = SplitForward(m, "resnet18", ["stem", "layer1", "layer2"], fold=True, prefix_channels_last=channels_last)
    x = torch.randn(6, 3, 32, 32)
    assert torch.equal(long.features_after(short.features(x), short.names), long.features(x))
    with pytest.raises(ValueError, match="not the start of the prefix"):
        long.features_after(short.features(x), ["layer1"])


# ---------------------------------------------------------------------------------------------
# A prefix that ends inside a stage (block freeze points)


@pytest.mark.parametrize("spec,prefix", [
    (FreezeConfig(until="layer2.0"), ["stem", "layer1", "layer2.0"]),
    (FreezeConfig(until="layer1.1"), ["stem", "layer1"]),  # a stage's last block is the stage
    (FreezeConfig(trainable=["layer2.1", "layer3", "layer4", "fc"]), ["stem", "layer1", "layer2.0"]),
    (FreezeConfig(trainable=["layer1.0", "layer2", "layer3", "layer4", "fc"]), ["stem"]),
])
def test_the_prefix_ends_inside_a_stage_at_its_last_frozen_block(resnet18, spec, prefix):
    apply_freeze(resnet18, spec, "resnet18")
    assert frozen_prefix(resnet18, "resnet18") == prefix


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("fold", [True, False])
def test_a_block_prefix_splits_the_forward_and_trains_the_rest_of_its_stage(channels_last, fold):
    m = model_with_real_bn_stats()
    plan = apply_freeze(m, FreezeConfig(until="layer2.0"), "resnet18")
    set_train_mode(m, plan)
    split = SplitForward(m, "resnet18", ["stem", "layer1", "layer2.0"], fold=fold, prefix_channels_last=channels_last)
    assert split.names[-3:] == ["layer1.0", "layer1.1", "layer2.0"] and split.suffix[0] == "layer2.1"
    x = torch.randn(4, 3, 32, 32)
    m.eval()  # the reference without batch statistics; the split's prefix is frozen either way
    with torch.no_grad():
        ref = m(x)
    out = split(x)
    if fold or channels_last:  # a folded convolution, or another layout's kernel, rounds differently
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:  # the model's own modules in the model's own order: the same operations
        assert torch.equal(out, ref)
    out.sum().backward()
    assert m.layer2[1].conv1.weight.grad is not None and m.layer2[0].conv1.weight.grad is None


@pytest.mark.parametrize(("short", "long"), [
    (["stem", "layer1"], ["stem", "layer1", "layer2.0"]),  # a stage grows into the next one's first block
    (["stem", "layer1", "layer2.0"], ["stem", "layer1", "layer2"]),  # a block grows into its whole stage
    (["stem"], ["stem", "layer1.0"]),
])
def test_a_prefix_grown_by_blocks_continues_the_shorter_one_bit_for_bit(short, long):
    m = model_with_real_bn_stats()
    apply_freeze(m, FreezeConfig(until="layer2"), "resnet18")
    m.eval()
    a = SplitForward(m, "resnet18", short, fold=True, prefix_channels_last=True)
    b = SplitForward(m, "resnet18", long, fold=True, prefix_channels_last=True)
    x = torch.randn(6, 3, 32, 32)
    assert b.continues(a.names)
    assert torch.equal(b.features_after(a.features(x), a.names), b.features(x))
