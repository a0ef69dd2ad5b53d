import pytest
import torch

from freezetune.errors import ConfigError
from freezetune.speed.execution import decide_cache as decide
from freezetune.speed.feature_cache import FeatureCache
from freezetune.training.recipe import run
from freezetune.training.run_dir import read_jsonl


def test_decide_explains_why_not(tiny):
    cfg = tiny(train__feature_cache="auto", freeze__trainable="[fc]", freeze__batchnorm="train")
    assert not decide(cfg, ["stem"], prefix_bn_frozen=False).enabled
    assert "statistics" in decide(cfg, ["stem"], prefix_bn_frozen=False).reason
    assert "no frozen prefix" in decide(cfg, [], True).reason
    aug = tiny(train__feature_cache="on", data__augment="true")
    with pytest.raises(ConfigError, match="random transforms"):
        decide(aug, ["stem"], True)
    assert decide(tiny(train__feature_cache="auto"), ["stem"], True).enabled


def test_feature_cache_on_refused_through_train(tiny):
    with pytest.raises(ConfigError, match="train.feature_cache: on is not possible"):
        run(tiny(train__feature_cache="on", freeze__trainable="[fc]", freeze__batchnorm="train"))


@pytest.mark.parametrize("max_bytes", [2**30, 0])  # in memory, and memory-mapped in the run folder
def test_cached_training_matches_uncached(tiny, tmp_path, max_bytes):
    common = dict(freeze__trainable="[layer4,fc]", train__epochs=3, data__val_size=0, optim__lr=0.05)
    plain = run(tiny(**common, output__dir=str(tmp_path / "plain")))
    cached = run(tiny(**common, train__feature_cache="on", train__feature_cache_max_bytes=max_bytes,
                      output__dir=str(tmp_path / "cached")))
    a, b = read_jsonl(tmp_path / "plain/metrics.jsonl"), read_jsonl(tmp_path / "cached/metrics.jsonl")
    assert [r["cached"] for r in b] == [False] * 4 + [True] * 8
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-4, atol=1e-5)
    assert cached["speed"]["feature_cache"]["on_disk"] == (max_bytes == 0)
    assert cached["freeze_integrity"]["ok"] and plain["freeze_integrity"]["ok"]


def test_a_prefix_ending_inside_a_stage_is_cached_and_stays_frozen(tiny, tmp_path):
    common = dict(freeze__until="layer2.0", train__epochs=2, data__val_size=0, optim__lr=0.05)
    plain = run(tiny(**common, output__dir=str(tmp_path / "plain")))
    cached = run(tiny(**common, train__feature_cache="on", output__dir=str(tmp_path / "cached")))
    assert cached["speed"]["frozen_prefix"] == ["stem", "layer1", "layer2.0"]
    a, b = read_jsonl(tmp_path / "plain/metrics.jsonl"), read_jsonl(tmp_path / "cached/metrics.jsonl")
    assert [r["cached"] for r in b] == [False] * 4 + [True] * 4
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-4, atol=1e-5)
    assert cached["freeze_integrity"]["ok"] and plain["freeze_integrity"]["ok"]
    # layer2.1 trained: the block after the prefix is not frozen with it.
    assert cached["params"]["by_module"]["layer2"]["trainable"] > 0 < cached["params"]["by_module"]["layer2"]["frozen"]


def test_stale_disk_cache_is_not_reused(tmp_path):
    c = FeatureCache(4, tmp_path, key="A", max_bytes=0)
    c.put(torch.arange(4), torch.ones(4, 2, 1, 1), torch.tensor([0, 1, 0, 1]))
    assert c.on_disk and FeatureCache(4, tmp_path, key="A", max_bytes=0).complete
    assert not FeatureCache(4, tmp_path, key="B", max_bytes=0).complete
    assert not FeatureCache(5, tmp_path, key="A", max_bytes=0).complete


def test_validation_reuses_the_prefix_features_of_a_cached_run(tiny):
    """The first validation pass keeps the frozen prefix's output; later passes give the same result from it."""
    from freezetune.training.recipe import Recipe
    from freezetune.training.step import evaluate

    cfg = tiny(freeze__until="layer3", train__feature_cache="on", data__val_size=8)
    recipe = Recipe(cfg).setup()
    engine = recipe.engine
    first = evaluate(engine, recipe.plan, recipe.data.val, 4, 0, recipe.loss_fn)
    assert engine.val_features and sum(y.shape[0] for _, y in engine.val_features) == 8
    again = evaluate(engine, recipe.plan, recipe.data.val, 4, 0, recipe.loss_fn)
    assert again == first
    recipe.model.eval()
    with torch.no_grad():
        x = torch.stack([recipe.data.val[i][0] for i in range(8)])
        y = torch.tensor([int(recipe.data.val[i][1]) for i in range(8)])
        plain = (recipe.model(x).argmax(1) == y).float().mean().item()
    assert first["accuracy"] == pytest.approx(plain)  # the folded prefix agrees with the model


def test_validation_features_that_do_not_fit_are_not_kept(tiny):
    from freezetune.training.recipe import Recipe
    from freezetune.training.step import evaluate

    cfg = tiny(freeze__until="layer3", train__feature_cache="on", data__val_size=8)
    recipe = Recipe(cfg).setup()
    recipe.engine.val_features_max_bytes = 1
    evaluate(recipe.engine, recipe.plan, recipe.data.val, 4, 0, recipe.loss_fn)
    assert recipe.engine.val_features == []


# --------------------------------------------------------------------------------------------
# The key: everything that changes a sample's features


PATH = {"prefix": ["stem", "layer1"], "fold": True, "channels_last": False, "compile": False, "precision": "fp32"}


@pytest.fixture
def keyed(tiny):
    """``key(**changes)``: the cache key of a tiny frozen model, with one thing changed."""
    from torch.utils.data import TensorDataset

    from freezetune.freezing.plan import apply_freeze
    from freezetune.models.weights import build_model
    from freezetune.speed.feature_cache import cache_key

    def key(config=None, device="cpu", path=None, data=None, moved=False):
        cfg = config or tiny(freeze__trainable="[layer4,fc]")
        torch.manual_seed(0)
        model = build_model(cfg.model).model
        plan = apply_freeze(model, cfg.freeze, cfg.model.name)
        if moved:
            with torch.no_grad():
                model.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-3
        dataset = data if data is not None else TensorDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4).long())
        return cache_key(model, plan, cfg, dataset, device, path or PATH)

    return key


def test_every_part_of_the_key_changes_it(keyed, tiny, monkeypatch):
    from torch.utils.data import TensorDataset

    base = keyed()
    assert keyed() == base  # the same inputs, the same key
    changed = {
        "frozen weights": keyed(moved=True),
        "data config": keyed(tiny(freeze__trainable="[layer4,fc]", data__image_size=64)),
        "seed": keyed(tiny(freeze__trainable="[layer4,fc]", seed=1)),
        "model config": keyed(tiny(freeze__trainable="[layer4,fc]", model__num_classes=5)),
        "dataset": keyed(data=TensorDataset(torch.ones(4, 3, 32, 32), torch.zeros(4).long())),
        "device": keyed(device="meta"),
    }
    for name, value in [("prefix", ["stem"]), ("fold", False), ("channels_last", True), ("compile", True),
                        ("precision", "bf16")]:
        changed[f"path {name}"] = keyed(path={**PATH, name: value})
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    changed["torch version"] = keyed()
    assert [name for name, key in changed.items() if key == base] == []
    assert len(set(changed.values())) == len(changed)


def test_a_resume_with_another_precision_refills_the_cache_on_disk(tiny, cli, tmp_path):
    # Memory-mapped in the run folder (max_bytes 0), so a resumed run could reuse it.
    common = dict(freeze__trainable="[fc]", train__feature_cache="on", train__feature_cache_max_bytes=0,
                  train__epochs=4, train__max_steps=6, data__val_size=0)
    same, other = tmp_path / "same", tmp_path / "other"
    for out in (same, other):
        run(tiny(**common, output__dir=str(out)))  # epoch 0 fills the cache, epoch 1 half trained from it
    assert cli("train", "--resume", same, "train.max_steps=16").exit_code == 0
    assert cli("train", "--resume", other, "train.max_steps=16", "train.precision=bf16").exit_code == 0
    cached = {out: [r["cached"] for r in read_jsonl(out / "metrics.jsonl")][6:] for out in (same, other)}
    assert cached[same] == [True] * 10  # the same key: the file is reused at once
    # bf16: not reused; the rest of epoch 1 and epoch 2 fill it again, and epoch 3 trains from it.
    assert cached[other] == [False] * 6 + [True] * 4
