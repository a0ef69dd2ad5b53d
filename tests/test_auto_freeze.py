"""freeze.auto: stages freeze mid-run, leave the optimizer, stay bit-identical, and resume exactly."""

import json
from pathlib import Path

import pytest
import torch

from freezetune.config import load_config
from freezetune.errors import ConfigError, FreezeError
from freezetune.freezing.auto import AutoFreezer, choose, percentile, relative_changes
from freezetune.training.checkpoint import load_checkpoint
from freezetune.training.recipe import Recipe, run
from freezetune.training.run_dir import read_jsonl

# 16 images in batches of 4: 4 steps per epoch. A threshold no change can reach makes the
# decision certain, so the tests see stem and layer1 freeze at the start of epoch 2 (step 8).
BASE = {
    "seed": 1, "device": "cpu", "model.weights": "none", "model.num_classes": 4,
    "data.image_size": 32, "data.batch_size": 4, "data.train_size": 16, "data.val_size": 8,
    "train.epochs": 4, "train.warmup_steps": 0, "train.feature_cache": "auto",
    "freeze.auto.criterion": "threshold", "freeze.auto.threshold": 1e9, "freeze.auto.max_stage": "layer1",
}


def overrides(out: Path, **extra) -> list[str]:
    values = {**BASE, "output.dir": str(out), **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{k}={v}" for k, v in values.items()]


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "event" not in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "straight"
    return out, run(load_config(None, overrides(out, train__checkpoint_every=2)))


# ---------------------------------------------------------------------------------------------
# The pure decision


def test_percentile_matches_numpy_linear_interpolation():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 25) == 2.5
    assert percentile([5.0], 90) == 5.0


def test_relative_change_is_against_the_interval_before():
    assert relative_changes({"a": 1.1, "b": 2.0}, {"a": 1.0, "b": 4.0}) == pytest.approx({"a": 0.1, "b": 0.5})
    assert relative_changes({"a": 1.0}, {"a": 0.0}) == {"a": float("inf")}  # no gradient before: moving


@pytest.mark.parametrize(("changes", "froze"), [
    ({"stem": 0.01, "layer1": 0.02, "layer2": 0.5, "layer3": 0.03, "head": 0.4}, ["stem", "layer1"]),
    ({"stem": 0.9, "layer1": 0.01, "layer2": 0.01, "head": 0.4}, []),  # the prefix must start at the input
    ({"stem": 0.1, "layer1": 0.1, "head": 0.1}, []),  # nothing is below the median of equals
])
def test_choose_freezes_the_longest_leading_run_below_the_median(changes, froze):
    cfg = load_config(None, ["freeze.auto=true"]).freeze.auto
    chosen, cut = choose(changes, [s for s in changes if s != "head"], cfg)
    assert chosen == froze
    assert cut == percentile(list(changes.values()), 50)


def test_choose_never_passes_the_candidates():
    cfg = load_config(None, ["freeze.auto.criterion=threshold", "freeze.auto.threshold=1.0"]).freeze.auto
    assert choose({"stem": 0.1, "layer1": 0.1, "head": 0.1}, ["stem"], cfg) == (["stem"], 1.0)


def test_auto_freezer_passes_over_stages_frozen_from_the_start(resnet18):
    from freezetune.freezing.plan import apply_freeze

    cfg = load_config(None, ["freeze.trainable=[layer1,layer3,fc]", "freeze.auto=true"])
    plan = apply_freeze(resnet18, cfg.freeze, "resnet18")
    auto = AutoFreezer(cfg.freeze.auto, resnet18, plan, "resnet18")
    assert auto.candidates() == ["layer1", "layer3"]
    with pytest.raises(FreezeError, match="max_stage: 'layer9' is not a freeze point of resnet18"):
        AutoFreezer(cfg.freeze.auto.model_copy(update={"max_stage": "layer9"}), resnet18, plan, "resnet18")


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(("extra", "message"), [
    (["freeze.auto=true", "freeze.schedule=[{epoch: 1, unfreeze: [layer4]}]"], "auto and schedule cannot be combined"),
    (["freeze.auto.threshold=0.1"], "threshold applies only with criterion: threshold"),
    (["freeze.auto.every=2", "freeze.auto.start_epoch=3"], "start_epoch must be at least 4"),
    (["freeze.auto.percentile=100"], "freeze.auto.percentile"),
    (["freeze.auto.evry=2"], "freeze.auto.evry: unknown key"),
])
def test_bad_auto_configs_are_refused_with_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, extra)


def test_auto_true_means_the_defaults_and_false_means_off():
    auto = load_config(None, ["freeze.auto=true"]).freeze.auto
    assert (auto.every, auto.first_check, auto.criterion, auto.percentile, auto.max_stage) == (1, 2, "percentile",
                                                                                              50.0, None)
    assert load_config(None, ["freeze.auto=false"]).freeze.auto is None
    assert load_config(None, ["freeze.auto.every=3"]).freeze.auto.first_check == 6


def test_a_bad_max_stage_is_one_line_and_exit_2(tiny_yaml, cli):
    result = cli("train", "--config", tiny_yaml(freeze__auto__max_stage="layer7"))
    assert result.exit_code == 2
    assert "freeze.auto.max_stage: 'layer7' is not a freeze point" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# A run that freezes


def test_stages_freeze_at_the_boundary_and_are_reported(straight):
    out, summary = straight
    events = summary["auto_freeze"]["events"]
    assert [(e["stage"], e["step"], e["epoch"]) for e in events] == [("stem", 8, 2), ("layer1", 8, 2)]
    assert all(e["change"] < e["cut"] and e["params"] > 0 and len(e["sha256"]) == 64 for e in events)
    logged = [r for r in read_jsonl(out / "events.jsonl") if r.get("event") == "auto_freeze"]
    assert [r["stage"] for r in logged] == ["stem", "layer1"] and "hashes" not in logged[0]
    checks = summary["auto_freeze"]["checks"]
    assert [c["epoch"] for c in checks] == [2]  # nothing left that may freeze: no more measuring
    assert [r["step"] for r in step_rows(out)] == list(range(1, 17))  # events are not steps


def test_frozen_stages_leave_the_optimizer_and_free_their_momentum(straight):
    out, summary = straight
    events = summary["auto_freeze"]["events"]
    # SGD momentum is one fp32 buffer per parameter element.
    assert [e["optimizer_bytes_freed"] for e in events] == [4 * e["params"] for e in events]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    held = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    trainable = [k for k in ckpt["model"] if not k.startswith(("conv1", "bn1", "layer1"))
                 and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert held == len(trainable) == len(ckpt["optimizer"]["state"])
    assert summary["optimizer"]["groups"][0]["params"] == summary["params"]["total"] - sum(e["params"] for e in events)


def test_stages_frozen_mid_run_are_bit_identical_from_then_on(straight):
    out, summary = straight
    integrity = summary["freeze_integrity"]
    events = summary["auto_freeze"]["events"]
    assert integrity["ok"] and integrity["frozen_mid_run"] == sum(e["tensors"] for e in events)
    # The step-8 checkpoint's frozen stages equal the final weights, bit for bit; layer2 moved on.
    final = load_checkpoint(out / "checkpoint.pt")["model"]
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.running_var"):
        assert torch.equal(final[key], _at_step(out, 8)[key]), key
    assert not torch.equal(final["layer2.0.conv1.weight"], _at_step(out, 8)["layer2.0.conv1.weight"])


def _at_step(out: Path, step: int) -> dict:
    cfg = load_config(None, overrides(out.parent / f"at-{step}", train__max_steps=step))
    if not (Path(cfg.output.dir) / "checkpoint.pt").exists():
        run(cfg)
    return load_checkpoint(Path(cfg.output.dir) / "checkpoint.pt")["model"]


def test_the_prefix_grows_into_the_fast_path(straight):
    out, summary = straight
    assert summary["speed"]["frozen_prefix"] == ["stem", "layer1"]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["cached"] for e in epochs] == [False, False, False, True]  # cache filled in epoch 2


# The stem is frozen from the start and cached (feature_cache: on, as the stem alone is too little
# for auto); layer1 freezes at epoch 2, and its cache is filled from the stem's.
GROWING = {"freeze__until": "stem", "train__feature_cache": "on"}


@pytest.fixture(scope="module")
def growing(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "growing"
    return out, run(load_config(None, overrides(out, train__checkpoint_every=2, **GROWING)))


def test_a_grown_prefix_fills_its_cache_from_the_old_one_and_trains_from_it_at_once(growing, tmp_path, monkeypatch):
    out, summary = growing
    assert [e["stage"] for e in summary["auto_freeze"]["events"]] == ["layer1"]
    epochs = read_jsonl(out / "epochs.jsonl")
    assert [e["cached"] for e in epochs] == [False, True, True, True]  # epoch 2 needed no image
    # The same run filling layer1's cache from images instead: the same losses, bit for bit.
    import freezetune.training.loop as loop_module

    monkeypatch.setattr(loop_module, "extend_cache", lambda old, new, batch_size: False)
    slow = tmp_path / "from-images"
    run(load_config(None, overrides(slow, **GROWING)))
    assert [e["cached"] for e in read_jsonl(slow / "epochs.jsonl")] == [False, True, False, True]
    assert [r["loss"] for r in step_rows(slow)] == [r["loss"] for r in step_rows(out)]


def test_resume_after_a_cache_grown_from_the_old_one_is_bit_identical(growing, tmp_path, cli):
    out_straight, _ = growing
    out = tmp_path / "split"
    run(load_config(None, overrides(out, train__checkpoint_every=2, train__max_steps=10, **GROWING)))
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 0, result.output
    assert [r["loss"] for r in step_rows(out)] == [r["loss"] for r in step_rows(out_straight)]


def test_a_frozen_tensor_that_moves_after_its_event_fails_the_integrity_check(tmp_path):
    recipe = Recipe(load_config(None, overrides(tmp_path / "r", train__epochs=3))).setup()
    recipe.start_training()
    while recipe.train_epoch() is not None:
        if recipe.auto.events:
            with torch.no_grad():
                recipe.model.layer1[0].conv1.weight.add_(1e-3)
    recipe.end_training()
    integrity = recipe.freeze_integrity()
    assert not integrity["ok"] and "layer1.0.conv1.weight" in integrity["changed"]
    recipe.cleanup()


def test_export_merges_the_stages_frozen_mid_run(straight, tmp_path):
    from safetensors.torch import load_file

    from freezetune.export import export_run

    out, _ = straight
    export_run(out, tmp_path / "w.safetensors")
    merged = load_file(tmp_path / "w.safetensors")
    final = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(merged[k], final[k]) for k in final)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("stop_at", [8, 10], ids=["at-the-boundary", "after-the-event"])
def test_resume_across_a_freeze_event_is_bit_identical(straight, tmp_path, stop_at, cli):
    out_straight, _ = straight
    out = tmp_path / "split"
    first = run(load_config(None, overrides(out, train__checkpoint_every=2, train__max_steps=stop_at)))
    assert len(first["auto_freeze"]["events"]) == (2 if stop_at > 8 else 0)
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 0, result.output
    assert [r["loss"] for r in step_rows(out)] == [r["loss"] for r in step_rows(out_straight)]
    events = [r for r in read_jsonl(out / "events.jsonl") if "event" in r]
    assert [r["stage"] for r in events] == ["stem", "layer1"]  # neither lost nor logged twice
    a, b = (load_checkpoint(d / "checkpoint.pt") for d in (out_straight, out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["auto_freeze"]["events"] == b["auto_freeze"]["events"]


def test_resume_refuses_a_checkpoint_whose_frozen_stage_was_tampered_with(tmp_path, cli):
    out = tmp_path / "r"
    run(load_config(None, overrides(out, train__max_steps=10)))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["model"]["layer1.0.conv1.weight"] += 1.0
    torch.save(ckpt, out / "checkpoint.pt")
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 2
    assert "layer1 (frozen at step 8) does not match its hash" in result.stderr
