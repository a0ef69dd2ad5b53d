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
