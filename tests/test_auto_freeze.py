"""freeze.auto: stages freeze mid-run, leave the optimizer, stay bit-identical, and resume exactly."""

import json
from pathlib import Path

import pytest
import torch

from freezetune.config import MIN_STEPS, load_config
from freezetune.errors import ConfigError, FreezeError
from freezetune.freezing.auto import AutoFreezer, StageStats, judge, percentile
from freezetune.training.checkpoint import load_checkpoint
from freezetune.training.recipe import Recipe, Reporter, run
from freezetune.training.run_dir import read_jsonl

pytestmark = pytest.mark.heavy(65)

# 16 images in batches of 4: 4 steps per epoch, 16 in all. Checks every 3 steps, so the first
# comparison of two intervals falls at step 6, in the middle of epoch 1; a threshold no change can
# reach makes the decision certain there (and min_steps 2 lets 3-step intervals count).
BASE = {
    "seed": 1, "device": "cpu", "model.weights": "none", "model.num_classes": 4,
    "data.image_size": 32, "data.batch_size": 4, "data.train_size": 16, "data.val_size": 8,
    "train.epochs": 4, "train.warmup_steps": 0, "train.feature_cache": "auto",
    "freeze.auto.criterion": "threshold", "freeze.auto.threshold": 1e9, "freeze.auto.max_stage": "layer1",
    "freeze.auto.every_steps": 3, "freeze.auto.min_steps": 2,
}
CHECK = 6  # the step stem and layer1 freeze after (epoch 1, its second step)
# freeze.auto measures and freezes blocks by default: layer1 freezes as its two blocks.
FROZEN = ["stem", "layer1.0", "layer1.1"]


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


def test_stage_stats_are_the_mean_and_sample_spread_of_the_steps():
    norms = [1.0, 2.0, 4.0]
    stats = StageStats.of(sum(norms), sum(n * n for n in norms), len(norms))
    assert stats.mean == pytest.approx(7 / 3) and stats.steps == 3
    assert stats.sd == pytest.approx(torch.tensor(norms, dtype=torch.float64).std().item())
    assert StageStats.of(2.0, 4.0, 1).sd == 0.0


def _stats(means: dict[str, float], sd: float = 0.0, steps: int = 40) -> dict[str, StageStats]:
    return {s: StageStats(m, sd, steps) for s, m in means.items()}


BEFORE = {"stem": 1.0, "layer1": 1.0, "layer2": 1.0, "layer3": 1.0, "head": 1.0}
CFG = load_config(None, ["freeze.auto=true"]).freeze.auto


# Each row: the interval's mean norms (the interval before has every mean at 1.0), their spread
# and step count, and what freezes. The default cut is the median change; the default noise_z 2.
@pytest.mark.parametrize(("now", "sd", "steps", "froze"), [
    # Clear evidence: no noise, stem and layer1 below the median change (0.03).
    ({"stem": 1.01, "layer1": 1.02, "layer2": 1.5, "layer3": 1.03, "head": 1.4}, 0.0, 40, ["stem", "layer1"]),
    # The prefix must start at the input: a moving stem keeps everything behind it.
    ({"stem": 1.9, "layer1": 1.01, "layer2": 1.01, "layer3": 1.5, "head": 1.4}, 0.0, 40, []),
    # Nothing is below the median of equals.
    ({"stem": 1.1, "layer1": 1.1, "layer2": 1.1, "layer3": 1.1, "head": 1.1}, 0.0, 40, []),
    # The same changes, but the per-step norms spread by 0.2: the standard error of the difference
    # (0.2 * sqrt(2 / 40) = 0.045) times 2 lifts stem's bound to 0.10 and layer1's to 0.11, above the cut.
    ({"stem": 1.01, "layer1": 1.02, "layer2": 1.5, "layer3": 1.03, "head": 1.4}, 0.2, 40, []),
    # A smaller spread leaves room for the stem alone (bounds 0.0245 and 0.0345 against 0.03).
    ({"stem": 1.01, "layer1": 1.02, "layer2": 1.5, "layer3": 1.03, "head": 1.4}, 0.05, 80, ["stem"]),
    # Too few steps in an interval: nothing freezes, however clear the figures look.
    ({"stem": 1.01, "layer1": 1.02, "layer2": 1.5, "layer3": 1.03, "head": 1.4}, 0.0, MIN_STEPS - 1, []),
])
def test_judge_freezes_the_leading_run_clearly_below_the_cut(now, sd, steps, froze):
    verdict = judge(_stats(now, sd, steps), _stats(BEFORE, sd, steps), ["stem", "layer1", "layer2", "layer3"], CFG)
    assert verdict.froze == froze
    assert verdict.cut == pytest.approx(percentile(list(verdict.changes.values()), 50))
    assert all(verdict.bounds[s] >= verdict.changes[s] for s in now)
    if steps < MIN_STEPS:
        assert verdict.reason == f"{steps} steps in an interval, fewer than min_steps {MIN_STEPS}"


def test_judge_never_passes_the_candidates_and_a_zero_norm_counts_as_moving():
    cfg = load_config(None, ["freeze.auto.criterion=threshold", "freeze.auto.threshold=1.0"]).freeze.auto
    now = _stats({"stem": 1.1, "layer1": 1.1, "head": 1.1})
    assert judge(now, _stats({"stem": 1.0, "layer1": 1.0, "head": 1.0}), ["stem"], cfg).froze == ["stem"]
    verdict = judge(now, _stats({"stem": 0.0, "layer1": 1.0, "head": 1.0}), ["stem", "layer1"], cfg)
    assert verdict.changes["stem"] == float("inf") and verdict.froze == []


def test_auto_freezer_passes_over_stages_frozen_from_the_start(resnet18):
    from freezetune.freezing.plan import apply_freeze

    cfg = load_config(None, ["freeze.trainable=[layer1,layer3,fc]", "freeze.auto=true"])
    plan = apply_freeze(resnet18, cfg.freeze, "resnet18")
    auto = AutoFreezer(cfg.freeze.auto, resnet18, plan, "resnet18")
    assert auto.candidates() == ["layer1.0", "layer1.1", "layer3.0", "layer3.1"]
    by_stage = AutoFreezer(cfg.freeze.auto.model_copy(update={"units": "stages"}), resnet18, plan, "resnet18")
    assert by_stage.candidates() == ["layer1", "layer3"]
    with pytest.raises(FreezeError, match="max_stage: 'layer9' is not a freeze point of resnet18"):
        AutoFreezer(cfg.freeze.auto.model_copy(update={"max_stage": "layer9"}), resnet18, plan, "resnet18")


def test_max_stage_names_a_stage_or_a_block_and_a_stage_means_its_last_block(resnet18):
    from freezetune.freezing.plan import apply_freeze

    cfg = load_config(None, ["freeze.auto=true"]).freeze.auto
    plan = apply_freeze(resnet18, load_config(None, []).freeze, "resnet18")
    assert AutoFreezer(cfg.model_copy(update={"max_stage": "layer2"}), resnet18, plan, "resnet18").may_freeze == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert AutoFreezer(cfg.model_copy(update={"max_stage": "layer2.0"}), resnet18, plan,
                       "resnet18").may_freeze[-1] == "layer2.0"
    stages = cfg.model_copy(update={"units": "stages"})
    with pytest.raises(FreezeError, match="'layer2.0' is not a freeze point of resnet18 in these units"):
        AutoFreezer(stages.model_copy(update={"max_stage": "layer2.0"}), resnet18, plan, "resnet18")


def test_a_checkpoint_measured_in_other_units_is_refused_in_one_line(straight, tmp_path, cli):
    import shutil

    out_straight, _ = straight
    out = tmp_path / "copy"
    shutil.copytree(out_straight, out)
    # As a folder from before block units reads: its config.yaml had no units, so it said stages then.
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("units: blocks", "units: stages"))
    result = cli("train", "--resume", out, "train.max_steps=20")
    assert result.exit_code == 2
    assert "not the config's units (stages); set units: blocks under freeze.auto" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(("extra", "message"), [
    (["freeze.auto=true", "freeze.schedule=[{epoch: 1, unfreeze: [layer4]}]"], "auto and schedule cannot be combined"),
    (["freeze.auto.threshold=0.1"], "threshold applies only with criterion: threshold"),
    (["freeze.auto.every=2"], "every and start_epoch counted epochs and are gone"),
    (["freeze.auto.checks=5", "freeze.auto.every_steps=10"], "give checks or every_steps, not both"),
    (["freeze.auto.min_steps=1"], "freeze.auto.min_steps"),
    (["freeze.auto.percentile=100"], "freeze.auto.percentile"),
    (["freeze.auto.evry=2"], "freeze.auto.evry: unknown key"),
])
def test_bad_auto_configs_are_refused_with_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, extra)


def test_auto_true_means_the_defaults_and_false_means_off():
    auto = load_config(None, ["freeze.auto=true"]).freeze.auto
    assert (auto.checks, auto.every_steps, auto.min_steps, auto.noise_z, auto.criterion, auto.percentile,
            auto.max_stage) == (10, None, MIN_STEPS, 2.0, "percentile", 50.0, None)
    assert (auto.interval(400), auto.interval(7)) == (40, 1)
    assert load_config(None, ["freeze.auto.every_steps=25"]).freeze.auto.interval(400) == 25
    assert load_config(None, ["freeze.auto=false"]).freeze.auto is None


def test_a_config_written_before_step_level_checks_still_loads():
    # A run folder's config.yaml lists every key, and the defaults then were every: 1, start_epoch: null.
    auto = load_config(None, ["freeze.auto={every: 1, start_epoch: null, criterion: percentile}"]).freeze.auto
    assert auto.checks == 10


def test_a_bad_max_stage_is_one_line_and_exit_2(tiny_yaml, cli):
    result = cli("train", "--config", tiny_yaml(freeze__auto__max_stage="layer7"))
    assert result.exit_code == 2
    assert "freeze.auto.max_stage: 'layer7' is not a freeze point" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# A run that freezes


def test_stages_freeze_mid_epoch_at_the_check_and_are_reported(straight):
    out, summary = straight
    events = summary["auto_freeze"]["events"]
    assert [(e["stage"], e["step"], e["epoch"]) for e in events] == [(s, CHECK, 1) for s in FROZEN]
    assert all(e["change"] <= e["bound"] < e["cut"] and e["params"] > 0 and len(e["sha256"]) == 64 for e in events)
    logged = [r for r in read_jsonl(out / "events.jsonl") if r.get("event") == "auto_freeze"]
    assert [r["stage"] for r in logged] == FROZEN and "hashes" not in logged[0]
    checks = summary["auto_freeze"]["checks"]
    assert [c["step"] for c in checks] == [CHECK]  # nothing left that may freeze: no more measuring
    assert checks[0]["steps"] == 3 and set(checks[0]["grad_norm"]) == {
        "stem", *(f"layer{i}.{b}" for i in range(1, 5) for b in range(2)), "head"}
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
    # The frozen stages at the check (a run stopped there) equal the final weights, bit for bit:
    # frozen mid-epoch, they took no step after it, and their BatchNorm statistics stopped too.
    final = load_checkpoint(out / "checkpoint.pt")["model"]
    at_check = _at_step(out, CHECK)
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.running_var",
                "layer1.1.bn2.num_batches_tracked"):
        assert torch.equal(final[key], at_check[key]), key
    assert not torch.equal(final["layer2.0.conv1.weight"], at_check["layer2.0.conv1.weight"])


def _at_step(out: Path, step: int) -> dict:
    cfg = load_config(None, overrides(out.parent / f"at-{step}", train__max_steps=step))
    if not (Path(cfg.output.dir) / "checkpoint.pt").exists():
        run(cfg)
    return load_checkpoint(Path(cfg.output.dir) / "checkpoint.pt")["model"]


def test_the_prefix_grows_into_the_fast_path(straight):
    out, summary = straight
    assert summary["speed"]["frozen_prefix"] == ["stem", "layer1"]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    # The cache starts filling mid-epoch 1, and is complete after epoch 2.
    assert [e["cached"] for e in epochs] == [False, False, False, True]


# The stem is frozen from the start and cached (feature_cache: on, as the stem alone is too little
# for auto); layer1 freezes mid-epoch 1, and its cache is filled from the stem's at once.
GROWING = {"freeze__until": "stem", "train__feature_cache": "on"}


@pytest.fixture(scope="module")
def growing(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "growing"
    return out, run(load_config(None, overrides(out, train__checkpoint_every=2, **GROWING)))


def test_a_grown_prefix_fills_its_cache_from_the_old_one_and_trains_from_it_at_once(growing, tmp_path, monkeypatch):
    out, summary = growing
    assert [e["stage"] for e in summary["auto_freeze"]["events"]] == ["layer1.0", "layer1.1"]
    epochs = read_jsonl(out / "epochs.jsonl")
    assert [e["cached"] for e in epochs] == [False, True, True, True]  # epoch 1 read no image, before or after
    # The same run filling layer1's cache from images instead: the same losses, bit for bit.
    import freezetune.training.loop as loop_module

    monkeypatch.setattr(loop_module, "extend_cache", lambda old, new, batch_size: False)
    slow = tmp_path / "from-images"
    run(load_config(None, overrides(slow, **GROWING)))
    # Epoch 1 reads images after the freeze, filling the cache; epoch 2 completes it.
    assert [e["cached"] for e in read_jsonl(slow / "epochs.jsonl")] == [False, False, False, True]
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


def _same_as_straight(out_straight: Path, out: Path) -> None:
    assert [r["loss"] for r in step_rows(out)] == [r["loss"] for r in step_rows(out_straight)]
    events = [r for r in read_jsonl(out / "events.jsonl") if "event" in r]
    assert [r["stage"] for r in events] == FROZEN  # neither lost nor logged twice
    a, b = (load_checkpoint(d / "checkpoint.pt") for d in (out_straight, out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["auto_freeze"]["events"] == b["auto_freeze"]["events"]
    assert a["auto_freeze"]["checks"] == b["auto_freeze"]["checks"]


@pytest.mark.parametrize("stop_at", [5, 7], ids=["before-the-check", "after-the-event-mid-epoch"])
def test_resume_across_a_mid_epoch_freeze_is_bit_identical(straight, tmp_path, stop_at, cli):
    out_straight, _ = straight
    out = tmp_path / "split"
    first = run(load_config(None, overrides(out, train__checkpoint_every=2, train__max_steps=stop_at)))
    assert len(first["auto_freeze"]["events"]) == (len(FROZEN) if stop_at > CHECK else 0)
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 0, result.output
    _same_as_straight(out_straight, out)


def test_resume_from_a_checkpoint_saved_just_before_its_steps_check_runs_that_check(straight, tmp_path, cli,
                                                                                    monkeypatch):
    # The checkpoint of step 6 is written before step 6's check; a crash between the two leaves it.
    from freezetune.training.freeze_controller import FreezeController

    out_straight, _ = straight
    out = tmp_path / "crashed"
    on_step = FreezeController.on_step

    def crash_at_the_check(self, step, epoch):
        if step == CHECK:
            raise RuntimeError("killed")
        return on_step(self, step, epoch)

    with monkeypatch.context() as m:
        m.setattr(FreezeController, "on_step", crash_at_the_check)
        with pytest.raises(RuntimeError, match="killed"):
            run(load_config(None, overrides(out, train__checkpoint_every=2)))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == CHECK
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 0, result.output
    _same_as_straight(out_straight, out)


def test_resume_refuses_a_checkpoint_whose_frozen_stage_was_tampered_with(tmp_path, cli):
    out = tmp_path / "r"
    run(load_config(None, overrides(out, train__max_steps=8)))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["model"]["layer1.0.conv1.weight"] += 1.0
    torch.save(ckpt, out / "checkpoint.pt")
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 2
    assert f"layer1.0 (frozen at step {CHECK}) does not match its hash" in result.stderr


# ---------------------------------------------------------------------------------------------
# The accuracy guard


@pytest.mark.parametrize(("best", "accuracy", "fell_"), [
    (None, 0.1, False),   # nothing to fall from
    (0.80, 0.795, False),  # within the tolerance (0.01)
    (0.80, 0.79, False),   # exactly the tolerance is still within it
    (0.80, 0.78, True),
])
def test_the_guard_rule_is_more_than_the_tolerance_below_the_best(best, accuracy, fell_):
    from freezetune.freezing.auto import fell

    assert fell(best, accuracy) is fell_


# Validation accuracies per epoch, scripted: the stages freeze at step 6 (epoch 1), and epoch 2
# falls to 0.60 from the best so far, 0.80 at epoch 1.
SCRIPTED = [0.50, 0.80, 0.60, 0.81]


@pytest.fixture
def scripted_validation(monkeypatch):
    import freezetune.training.recipe as recipe_module

    real = recipe_module.evaluate

    def evaluate(engine, plan, *args, **kwargs):
        result = real(engine, plan, *args, **kwargs)
        epoch = evaluate.calls
        evaluate.calls += 1
        return {**result, "accuracy": SCRIPTED[epoch]}

    evaluate.calls = 0
    monkeypatch.setattr(recipe_module, "evaluate", evaluate)
    return evaluate


def test_a_drop_after_a_freeze_is_said_logged_and_summarized(tmp_path, scripted_validation):
    pytest.importorskip("tensorboard")
    lines = []

    class Console(Reporter):
        def message(self, text):
            lines.append(text)

    out = tmp_path / "guarded"
    summary = run(load_config(None, overrides(out, output__tensorboard=True)), reporter=Console())
    guard = summary["auto_freeze"]["guard"]
    assert (guard["tolerance"], guard["best_accuracy"], guard["best_epoch"]) == (0.01, 0.81, 3)
    assert [(d["epoch"], d["best"], d["best_epoch"], d["frozen"]) for d in guard["drops"]] == [
        (2, 0.80, 1, FROZEN)]
    assert guard["drops"][0]["drop"] == pytest.approx(0.20)
    said = [line for line in lines if "below the best so far" in line]
    assert said == ["epoch 2: val accuracy 0.600 is 0.200 below the best so far (0.800, epoch 1) since freeze.auto "
                    "froze stem, layer1.0, layer1.1; full fine-tuning may do better here (more than the 0.01 "
                    "tolerance)"]
    logged = [r for r in read_jsonl(out / "events.jsonl") if r.get("event") == "accuracy_drop"]
    assert [r["epoch"] for r in logged] == [2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert any(b"below the best so far" in t.tensor_proto.string_val[0] for t in texts.Tensors("events/text_summary"))


def test_no_freeze_no_warning(tmp_path, scripted_validation):
    summary = run(load_config(None, overrides(tmp_path / "r", freeze__auto__threshold=1e-12)))
    assert summary["auto_freeze"]["events"] == [] and summary["auto_freeze"]["guard"]["drops"] == []


def test_the_guard_state_survives_a_resume(tmp_path, scripted_validation, cli):
    out = tmp_path / "split"
    run(load_config(None, overrides(out, train__max_steps=12)))  # ends after epoch 2's validation
    result = cli("train", "--resume", out, "train.max_steps=16")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    drops = summary["auto_freeze"]["guard"]["drops"]
    assert [(d["epoch"], d["best"]) for d in drops] == [(2, 0.80)]  # epoch 3 (0.81) is not a drop
    assert [r["epoch"] for r in read_jsonl(out / "events.jsonl") if r.get("event") == "accuracy_drop"] == [2]
