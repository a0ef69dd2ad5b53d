"""One training step, one validation pass and the feature cache, on engines built by hand.

The engines here are what :meth:`Recipe._setup_execution` builds (model, optimizer, optional frozen
prefix split and feature cache), on a random-init ResNet18 and 32 px images, so each test checks
:mod:`freezetune.training.step` itself rather than a whole run.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from freezetune.config import FreezeConfig
from freezetune.freezing.integrity import fingerprint
from freezetune.freezing.plan import apply_freeze, set_train_mode
from freezetune.speed.feature_cache import FeatureCache
from freezetune.speed.prefix import SplitForward, frozen_prefix
from freezetune.training.step import Batch, BatchSource, Engine, evaluate, extend_cache, fill_cache, train_step

CPU = torch.device("cpu")


def images(n=8, size=32, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def with_bn_stats(model):
    """Gives every BatchNorm non-trivial statistics, so a BN that updates or folds wrongly shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return model


def engine_for(model, spec, split=False, cache_dir=None, lr=0.1, **kwargs):
    """Freezes ``model`` by ``spec`` and returns (engine, plan), as the recipe builds them."""
    plan = apply_freeze(model, spec, "resnet18")
    set_train_mode(model, plan)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine = Engine(model, optimizer, CPU, **kwargs)
    if split or cache_dir is not None:
        engine.split = SplitForward(model, "resnet18", frozen_prefix(model, "resnet18"), fold=True)
    if cache_dir is not None:
        engine.cache = FeatureCache(8, cache_dir, key="k")
    return engine, plan


def image_batch(x, y, source=BatchSource.IMAGES):
    return Batch(x, y, torch.arange(len(y)), source)


class Linear(nn.Module):
    """A model small enough that the step's effect on it can be checked by hand."""

    def __init__(self, size=8, classes=4):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class ScaledLoss(nn.Module):
    """Cross-entropy times a factor: ``inf`` or ``nan`` makes a non-finite loss on demand."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, logits, y):
        return F.cross_entropy(logits, y) * self.factor


def linear_engine(stop_on_nonfinite=True, lr=0.1):
    torch.manual_seed(0)
    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Engine(model, optimizer, CPU, stop_on_nonfinite=stop_on_nonfinite)


# --------------------------------------------------------------------------------------------
# Batch, BatchSource, Engine


def test_batch_size_counts_labels_and_sources_have_stable_names():
    batch = Batch(torch.zeros(5, 3, 4, 4), torch.zeros(5, dtype=torch.long), None, BatchSource.IMAGES)
    assert batch.size == 5 and isinstance(batch.size, int)
    assert Batch(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), None, BatchSource.FEATURES).size == 0
    # The values are what metrics and logs show; renaming one would break reading old runs.
    assert {s.value for s in BatchSource} == {"images", "images+cache", "features"}
    with pytest.raises(AttributeError):  # frozen dataclass
        batch.source = BatchSource.FEATURES


def test_engine_memory_format_follows_channels_last():
    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Engine(model, opt, CPU).memory_format is torch.contiguous_format
    assert Engine(model, opt, CPU, channels_last=True).memory_format is torch.channels_last


def test_engine_forward_prefers_split_then_compiled_then_model(resnet18):
    x, _ = images(2)
    engine, _ = engine_for(resnet18, FreezeConfig(until="layer2"))
    resnet18.eval()
    with torch.no_grad():
        ref = resnet18(x)
        torch.testing.assert_close(engine.forward(x), ref)
        engine.compiled = lambda t: torch.full((t.shape[0], 10), 7.0)  # stands in for torch.compile
        assert torch.equal(engine.forward(x), torch.full((2, 10), 7.0))
        engine.split = SplitForward(resnet18, "resnet18", ["stem", "layer1", "layer2"], fold=True)
        torch.testing.assert_close(engine.forward(x), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# train_step


@pytest.mark.parametrize("split", [False, True], ids=["plain", "frozen-prefix"])
def test_train_step_leaves_frozen_weights_bit_identical_and_moves_trainable_ones(resnet18, split):
    with_bn_stats(resnet18)
    engine, plan = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]), split=split)
    assert (engine.split is not None) == split
    frozen_before = fingerprint(resnet18, plan)
    trainable_before = {n: p.detach().clone() for n, p in resnet18.named_parameters() if p.requires_grad}
    for seed in range(3):
        loss, seconds = train_step(engine, image_batch(*images(8, seed=seed)), nn.CrossEntropyLoss())
        assert math.isfinite(loss) and loss > 0 and seconds > 0
    assert fingerprint(resnet18, plan) == frozen_before  # weights and frozen BN statistics alike
    moved = [n for n, p in resnet18.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert "fc.weight" in moved and "layer4.1.conv2.weight" in moved
    assert set(moved) == set(trainable_before)  # every trainable tensor took an update
    assert resnet18.layer3[0].conv1.weight.grad is None  # no gradient was ever made for frozen ones


def test_train_step_returns_the_loss_before_the_update_and_applies_one_sgd_step():
    engine = linear_engine(lr=0.5)
    x, y = images(6, size=8, classes=4)
    w, b = engine.model.fc.weight.detach().clone(), engine.model.fc.bias.detach().clone()
    w.requires_grad_(True), b.requires_grad_(True)
    expected = F.cross_entropy(x.flatten(1) @ w.T + b, y)
    expected.backward()
    loss, _ = train_step(engine, image_batch(x, y), nn.CrossEntropyLoss())
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(engine.model.fc.weight, (w - 0.5 * w.grad).detach())
    torch.testing.assert_close(engine.model.fc.bias, (b - 0.5 * b.grad).detach())


@pytest.mark.parametrize("factor", [float("inf"), float("nan")])
def test_a_non_finite_loss_skips_the_update_when_stop_on_nonfinite(factor):
    engine = linear_engine(stop_on_nonfinite=True)
    probes = []
    engine.grad_probe = lambda: probes.append(1)
    before = copy.deepcopy(engine.model.state_dict())
    x, y = images(4, size=8, classes=4)
    loss, seconds = train_step(engine, image_batch(x, y), ScaledLoss(factor))
    assert not math.isfinite(loss) and seconds >= 0
    for name, t in engine.model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert engine.model.fc.weight.grad is None  # no backward either
    assert probes == []  # nothing was updated, so nothing to measure
    assert not engine.optimizer.state  # SGD without momentum keeps none; the step never ran


def test_a_non_finite_loss_is_applied_when_stop_on_nonfinite_is_off():
    engine = linear_engine(stop_on_nonfinite=False)
    x, y = images(4, size=8, classes=4)
    loss, _ = train_step(engine, image_batch(x, y), ScaledLoss(float("inf")))
    assert loss == float("inf")
    assert not torch.isfinite(engine.model.fc.weight).all()  # the update went through, poisoning the weights


def test_grad_probe_runs_once_after_each_update():
    engine = linear_engine()
    seen = []
    engine.grad_probe = lambda: seen.append(engine.model.fc.weight.grad.clone())
    x, y = images(4, size=8, classes=4)
    for _ in range(2):
        train_step(engine, image_batch(x, y), nn.CrossEntropyLoss())
    assert len(seen) == 2 and all(g.abs().sum() > 0 for g in seen)


def test_images_fill_cache_trains_and_stores_the_prefix_output(resnet18, tmp_path):
    with_bn_stats(resnet18)
    engine, plan = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]), cache_dir=tmp_path)
    x, y = images(8)
    expected = engine.split.features(x)
    fc_before = resnet18.fc.weight.detach().clone()
    batch = Batch(x[:4], y[:4], torch.tensor([5, 1, 7, 3]), BatchSource.IMAGES_FILL_CACHE)
    train_step(engine, batch, nn.CrossEntropyLoss())
    assert not torch.equal(resnet18.fc.weight, fc_before)
    assert engine.cache.filled.tolist() == [False, True, False, True, False, True, False, True]
    h, labels = engine.cache.get(torch.tensor([5, 1, 7, 3]))
    torch.testing.assert_close(h, expected[:4], rtol=1e-5, atol=1e-6)
    assert labels.tolist() == y[:4].tolist()
    assert not engine.cache.complete


def test_a_features_batch_trains_the_head_like_the_images_batch(resnet18, tmp_path):
    with_bn_stats(resnet18)
    ref_model = copy.deepcopy(resnet18)
    images_engine, _ = engine_for(ref_model, FreezeConfig(trainable=["layer4", "fc"]), split=True)
    features_engine, _ = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]), cache_dir=tmp_path)
    x, y = images(8)
    h = features_engine.split.features(x)
    loss_img, _ = train_step(images_engine, image_batch(x, y), nn.CrossEntropyLoss())
    loss_feat, _ = train_step(features_engine, Batch(h, y, torch.arange(8), BatchSource.FEATURES),
                              nn.CrossEntropyLoss())
    assert loss_feat == pytest.approx(loss_img, rel=1e-5)
    torch.testing.assert_close(resnet18.fc.weight, ref_model.fc.weight, rtol=1e-5, atol=1e-6)
    assert not features_engine.cache.filled.any()  # reading features never writes the cache


# --------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_matches_a_hand_computation_and_leaves_the_model_training(resnet18):
    with_bn_stats(resnet18)
    engine, plan = engine_for(resnet18, FreezeConfig(until="layer2"))
    x, y = images(7, seed=3)
    resnet18.eval()
    with torch.no_grad():
        logits = resnet18(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    set_train_mode(resnet18, plan)
    before = copy.deepcopy(resnet18.state_dict())
    # Batches of 3 over 7 samples: the mean loss is weighted by batch size, not a mean of batch means.
    result = evaluate(engine, plan, TensorDataset(x, y), 3, 0, nn.CrossEntropyLoss())
    assert result["samples"] == 7
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert resnet18.training and resnet18.layer4[0].bn1.training  # trainable BN back in train mode
    assert not resnet18.layer1[0].bn1.training  # frozen BN stays in eval mode
    for name, t in resnet18.state_dict().items():  # validation changes nothing, BN statistics included
        assert torch.equal(t, before[name]), name


def test_evaluate_counts_correct_predictions(resnet18):
    engine, plan = engine_for(resnet18, FreezeConfig(until="layer2"))
    x, _ = images(6)
    resnet18.eval()
    with torch.no_grad():
        predicted = resnet18(x).argmax(1)
    wrong = (predicted + 1) % 10
    labels = torch.cat([predicted[:4], wrong[4:]])  # 4 of 6 right, by construction
    assert evaluate(engine, plan, TensorDataset(x, labels), 4, 0, nn.CrossEntropyLoss())["accuracy"] == 4 / 6


def test_evaluate_on_an_empty_set_reports_zero_samples(resnet18):
    engine, plan = engine_for(resnet18, FreezeConfig(until="layer2"))
    empty = TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    assert evaluate(engine, plan, empty, 4, 0, nn.CrossEntropyLoss()) == {"loss": 0.0, "accuracy": 0.0, "samples": 0}


def test_cached_evaluate_keeps_the_prefix_output_and_reads_it_back(resnet18, tmp_path):
    with_bn_stats(resnet18)
    engine, plan = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]), cache_dir=tmp_path)
    engine.val_features_max_bytes = 2**30
    x, y = images(6, seed=4)
    first = evaluate(engine, plan, TensorDataset(x, y), 4, 0, nn.CrossEntropyLoss())
    assert [t.shape[0] for _, t in engine.val_features] == [4, 2]
    torch.testing.assert_close(torch.cat([h for h, _ in engine.val_features]), engine.split.features(x))
    # The second pass reads the kept features, not the dataset: other images give the same answer.
    other = TensorDataset(*images(6, seed=5))
    assert evaluate(engine, plan, other, 4, 0, nn.CrossEntropyLoss()) == first
    resnet18.eval()
    with torch.no_grad():
        plain = resnet18(x)
    assert first["loss"] == pytest.approx(F.cross_entropy(plain, y).item(), rel=1e-4)


@pytest.mark.parametrize("budget", [0, 1, "training cache"], ids=["none", "too-small", "taken-by-training"])
def test_cached_evaluate_keeps_nothing_over_budget(resnet18, tmp_path, budget):
    engine, plan = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]), cache_dir=tmp_path)
    x, y = images(6)
    if budget == "training cache":
        fill_cache(engine, [image_batch(*images(8))])  # fills the training cache...
        engine.val_features_max_bytes = engine.cache.nbytes + 100  # ...leaving less than one val batch
    else:
        engine.val_features_max_bytes = budget
    first = evaluate(engine, plan, TensorDataset(x, y), 4, 0, nn.CrossEntropyLoss())
    assert engine.val_features == []
    assert evaluate(engine, plan, TensorDataset(x, y), 4, 0, nn.CrossEntropyLoss()) == first


def test_cached_evaluate_keeps_nothing_when_the_training_cache_is_on_disk(resnet18, tmp_path):
    engine, plan = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]))
    engine.split = SplitForward(resnet18, "resnet18", frozen_prefix(resnet18, "resnet18"), fold=True)
    engine.cache = FeatureCache(8, tmp_path, key="k", max_bytes=0)
    fill_cache(engine, [image_batch(*images(8))])
    assert engine.cache.on_disk
    engine.val_features_max_bytes = 2**30
    evaluate(engine, plan, TensorDataset(*images(4)), 4, 0, nn.CrossEntropyLoss())
    assert engine.val_features == []


# --------------------------------------------------------------------------------------------
# fill_cache and extend_cache


def test_fill_cache_refuses_an_engine_without_a_cache():
    with pytest.raises(ValueError, match="no feature cache"):
        fill_cache(linear_engine(), [image_batch(*images(2, size=8, classes=4))])


def test_fill_cache_stores_exactly_the_prefix_output_and_trains_nothing(resnet18, tmp_path):
    with_bn_stats(resnet18)
    engine, plan = engine_for(resnet18, FreezeConfig(trainable=["layer4", "fc"]), cache_dir=tmp_path)
    before = copy.deepcopy(resnet18.state_dict())
    x, y = images(8)
    order = torch.tensor([6, 2, 0, 4, 1, 7, 3, 5])  # batches arrive in sampler order, not dataset order
    batches = [Batch(x[order[i:i + 3]], y[order[i:i + 3]], order[i:i + 3], BatchSource.IMAGES) for i in (0, 3, 6)]
    seconds = fill_cache(engine, batches)
    assert seconds > 0 and engine.cache.complete and not engine.cache.on_disk
    h, labels = engine.cache.get(torch.arange(8))
    assert torch.equal(h, engine.split.features(x))  # the same prefix, the same numbers, bit for bit
    assert labels.tolist() == y.tolist()
    # ...and the folded prefix computes what the model's own frozen stem..layer3 do in eval mode.
    resnet18.eval()
    with torch.no_grad():
        ref = resnet18.layer3(resnet18.layer2(resnet18.layer1(resnet18.maxpool(resnet18.relu(
            resnet18.bn1(resnet18.conv1(x)))))))
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4)
    for name, t in resnet18.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert resnet18.fc.weight.grad is None


def two_prefixes(resnet18, tmp_path, short=("stem",), long=("stem", "layer1", "layer2")):
    """Engines on one model, frozen through layer2: the old one splits after ``short``, the new after ``long``."""
    with_bn_stats(resnet18)
    plan = apply_freeze(resnet18, FreezeConfig(until="layer2"), "resnet18")
    set_train_mode(resnet18, plan)
    optimizer = torch.optim.SGD([p for p in resnet18.parameters() if p.requires_grad], lr=0.1)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = Engine(resnet18, optimizer, CPU, split=SplitForward(resnet18, "resnet18", list(short), fold=True),
                 cache=FeatureCache(8, tmp_path / "old", key="old"))
    new = Engine(resnet18, optimizer, CPU, split=SplitForward(resnet18, "resnet18", list(long), fold=True),
                 cache=FeatureCache(8, tmp_path / "new", key="new"))
    return old, new


def test_extend_cache_runs_only_the_newly_frozen_stages_over_the_old_cache(resnet18, tmp_path):
    old, new = two_prefixes(resnet18, tmp_path)
    x, y = images(8)
    fill_cache(old, [image_batch(x, y)])
    calls = []
    hooks = [new.split.prefix_module(name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
             for name in new.split.names]
    assert extend_cache(old, new, batch_size=3)
    for hook in hooks:
        hook.remove()
    # Batches of 3 over 8 cached samples, through layer1 and layer2 only (block by block): the stem
    # never runs again.
    assert calls == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"] * 3
    assert new.cache.complete
    h, labels = new.cache.get(torch.arange(8))
    assert torch.equal(h, new.split.features(x))  # as if filled from the images, bit for bit
    assert labels.tolist() == y.tolist()


def test_extend_cache_declines_what_it_cannot_extend(resnet18, tmp_path):
    old, new = two_prefixes(resnet18, tmp_path)
    x, y = images(8)
    fill_cache(old, [image_batch(x[:4], y[:4])])
    assert not old.cache.complete and not extend_cache(old, new, 4)  # half-filled old cache
    fill_cache(old, [Batch(x[4:], y[4:], torch.arange(4, 8), BatchSource.IMAGES)])
    assert not extend_cache(old, old, 4)  # the same prefix: nothing froze in between
    assert not extend_cache(new, old, 4)  # a shorter new prefix does not continue the old one
    assert not extend_cache(old, Engine(resnet18, old.optimizer, CPU, split=new.split), 4)  # no new cache
    assert not extend_cache(Engine(resnet18, old.optimizer, CPU), new, 4)  # no old cache at all
    assert not new.cache.filled.any()
    old.cache.on_disk = True  # a memory-mapped cache shares its file with the new one
    assert not extend_cache(old, new, 4)
    old.cache.on_disk = False
    assert extend_cache(old, new, 4) and new.cache.complete
