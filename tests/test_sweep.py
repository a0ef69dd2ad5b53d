"""``freezetune sweep`` end to end on tiny data: arms equal train, no shared RNG, emit/collect, resume, pruning."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import tiny_overrides
from freezetune.config import load_config
from freezetune.errors import ConfigError
from freezetune.sweep import SweepArm, collect, default_arms, emit, merge_arms, optional_arms, resume, sweep
from freezetune.sweep.arms import arm_config, load_arms_file
from freezetune.training.recipe import run

pytestmark = pytest.mark.heavy(95)

ARMS = ("full", "layer3", "layer4")
ONE = (1.0,)  # the single-rate sweep: these tests are about arms, not rates


def _accuracies(run_dir) -> list[float]:
    return [json.loads(line)["val_accuracy"] for line in (run_dir / "epochs.jsonl").read_text().splitlines()]


def _arms(cfg, names=ARMS):
    return merge_arms(default_arms(cfg), [], list(names))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_at):
    """Two epochs of 6 batches each (so that a signal can land mid-epoch), 16 validation images."""
    out = tmp_path_factory.mktemp("sweep-base")
    return tiny_at(out / "run", train__epochs=2, data__train_size=24, data__val_size=16)


@pytest.fixture(scope="module")
def swept(base, tmp_path_factory):
    """One in-process sweep over full, layer3 and layer4, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    return out, sweep(base, out, _arms(base), prune=False, memory=False, lr_grid=ONE)


def test_each_arm_equals_train_of_its_config_exactly(swept, tmp_path):
    out, result = swept
    for name in ARMS:
        cfg = load_config(out / "configs" / name / "seed-0.yaml", [f"output.dir={tmp_path / name}"])
        run(cfg)
        assert _accuracies(tmp_path / name) == result["arms"][name]["seeds"][0]["val_accuracy_by_epoch"]
        assert len(result["arms"][name]["seeds"][0]["val_accuracy_by_epoch"]) == 2


def test_sweep_json_has_the_promised_keys(swept):
    out, result = swept
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk == result
    assert result["schema_version"] == 2 and result["tolerance"] == pytest.approx(0.01)
    for name in ARMS:
        arm = result["arms"][name]
        assert {"mean", "sd"} <= set(arm["val_accuracy"]) and arm["wall_s"]["mean"] > 0
        assert "mean" in arm["time_to_target_s"]
        seed = arm["seeds"][0]
        assert len(seed["epoch_wall_s"]) == 2 and seed["pruned_at_epoch"] is None
        assert 0 < arm["trainable_pct"] <= 100 and arm["flops_per_step"] > 0
    assert result["arms"]["layer4"]["feature_cache"] and not result["arms"]["full"]["feature_cache"]
    assert set(result["pareto"]) <= set(ARMS) and result["recommendation"]["arm"] in ARMS
    assert result["recommendation"]["reason"]
    best = max(result["arms"][n]["val_accuracy"]["mean"] for n in ARMS)
    assert result["target_accuracy"] == pytest.approx(best - 0.01)
    header = (out / "sweep.csv").read_text().splitlines()[0]
    assert header.startswith("arm,seed,label,status")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_arms_do_not_share_rng(base, tmp_path):
    """With augmentation the loop draws from torch's RNG; layer3 must not notice its neighbours."""
    cfg = base.model_copy(update={"data": base.data.model_copy(update={"augment": True}),
                                  "train": base.train.model_copy(update={"epochs": 1})})
    a = sweep(cfg, tmp_path / "a", _arms(cfg, ("full", "layer3")), prune=False, memory=False, lr_grid=ONE)
    b = sweep(cfg, tmp_path / "b", _arms(cfg, ("layer3", "layer4")), prune=False, memory=False, lr_grid=ONE)
    losses = [[json.loads(x)["loss"] for x in (p / "runs/layer3/seed-0/metrics.jsonl").read_text().splitlines()]
              for p in (tmp_path / "a", tmp_path / "b")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    acc = [r["arms"]["layer3"]["seeds"][0]["val_accuracy_by_epoch"] for r in (a, b)]
    assert acc[0] == acc[1]


def test_emit_then_train_then_collect_matches_the_in_process_sweep(base, tmp_path, cli):
    """A scheduler's view: emitted configs, each trained by `freezetune train`, then collected."""
    arms = _arms(base, ("full", "layer4"))
    inline = sweep(base, tmp_path / "inline", arms, prune=False, memory=False, tolerance=1.0 - 1e-9, lr_grid=ONE)
    manifest = emit(base, tmp_path / "jobs", arms, tolerance=1.0 - 1e-9, lr_grid=ONE)
    lines = (tmp_path / "jobs" / "jobs.txt").read_text().splitlines()
    assert len(lines) == len(manifest.jobs) == 2
    for line in lines:
        args = line.split()[1:]  # "freezetune train --config PATH"
        assert cli(*args).exit_code == 0
    collected = collect(tmp_path / "jobs")
    for name in ("full", "layer4"):
        assert (collected["arms"][name]["seeds"][0]["val_accuracy_by_epoch"]
                == inline["arms"][name]["seeds"][0]["val_accuracy_by_epoch"])
        assert collected["arms"][name]["peak_memory_bytes"] > 0  # each job had a process of its own
    # Every arm is within the (huge) tolerance, so the pick is the cheaper one: fc only, cached.
    assert collected["recommendation"]["arm"] == inline["recommendation"]["arm"] == "layer4"
    assert collected["mode"] == "collected"


def test_collect_refuses_unfinished_jobs_naming_one(base, tmp_path, cli):
    emit(base, tmp_path / "jobs", _arms(base, ("full", "layer4")), lr_grid=ONE)
    result = cli("sweep", "--collect", tmp_path / "jobs")
    assert result.exit_code == 2
    assert "job full seed 0 is missing" in result.stderr and "freezetune train --config" in result.stderr


class _Epochs:
    """A reporter that records which epochs were trained."""

    def __init__(self):
        self.epochs = []

    def start(self, *args):
        pass

    def epoch(self, arm, seed, record, epochs):
        self.epochs.append((arm, record.epoch))

    def pruned(self, arm, epoch):
        pass

    def message(self, text):
        pass


def test_ctrl_c_mid_epoch_then_resume_finishes_without_retraining(base, swept, tmp_path, monkeypatch):
    """Ctrl-C during full's second epoch: it saves mid-epoch; --resume trains only what is left."""
    from freezetune.training import loop as loop_mod

    out = tmp_path / "sweep"
    calls = {"n": 0}
    original = loop_mod.TrainingLoop._step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 21:  # 6 steps an epoch, turns full, layer3, layer4: full's 2nd epoch, 3rd step
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loop_mod.TrainingLoop, "_step", step)
    first = _Epochs()
    stopped = sweep(base, out, _arms(base), prune=False, memory=False, reporter=first, lr_grid=ONE)
    assert stopped["status"] == "interrupted"
    monkeypatch.setattr(loop_mod.TrainingLoop, "_step", original)
    assert first.epochs == [("full", 0), ("layer3", 0), ("layer4", 0)]
    assert json.loads((out / "runs/full/seed-0/summary.json").read_text())["status"] == "interrupted"

    second = _Epochs()
    result = resume(out, reporter=second)
    assert second.epochs == [("full", 1), ("layer3", 1), ("layer4", 1)]  # finished epochs are not retrained
    steps = [json.loads(x)["step"] for x in (out / "runs/full/seed-0/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # nor finished steps
    _, uninterrupted = swept
    for name in ARMS:
        rows = (out / "runs" / name / "seed-0" / "epochs.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [0, 1]
        assert (result["arms"][name]["seeds"][0]["val_accuracy_by_epoch"]
                == uninterrupted["arms"][name]["seeds"][0]["val_accuracy_by_epoch"])
    assert result["arms"]["full"]["status"] == "completed"


def test_pruned_arms_stop_and_are_reported_as_pruned(base, tmp_path, monkeypatch):
    """The plumbing of pruning (the rule itself is tested in test_sweep_analysis.py)."""
    from freezetune.sweep import turns as turns_mod

    cfg = base.model_copy(update={"train": base.train.model_copy(update={"epochs": 3}),
                                  "data": base.data.model_copy(update={"train_size": 8})})
    monkeypatch.setattr(turns_mod, "prune_at",
                        lambda curves, *a, **k: {"layer4": 2} if len(curves["full"]) >= 2 else {})
    result = sweep(cfg, tmp_path / "s", _arms(cfg, ("full", "layer4")), prune=True, memory=False, lr_grid=ONE)
    arm = result["arms"]["layer4"]
    assert arm["status"] == "pruned" and arm["pruned_at_epoch"] == 2
    assert arm["seeds"][0]["pruned_at_epoch"] == 2 and len(arm["seeds"][0]["val_accuracy_by_epoch"]) == 2
    summary = json.loads((tmp_path / "s/runs/layer4/seed-0/summary.json").read_text())
    assert summary["status"] == "pruned" and "pruned by the sweep after epoch 2" in summary["error"]
    assert result["arms"]["full"]["status"] == "completed"
    assert result["recommendation"]["arm"] == "full" and "layer4" not in result["pareto"]


def test_the_auto_arm_freezes_during_the_sweep_and_is_a_point_of_its_own(base, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tmp_path / "run"), "train.epochs=3", "data.train_size=8",
                             "freeze.auto.criterion=threshold", "freeze.auto.threshold=1e9",
                             "freeze.auto.max_stage=layer2", "freeze.auto.every_steps=2", "freeze.auto.min_steps=2"])
    result = sweep(cfg, tmp_path / "s", _arms(cfg, ("full", "auto")), prune=False, memory=False, lr_grid=ONE)
    summary = json.loads((tmp_path / "s/runs/auto/seed-0/summary.json").read_text())
    assert summary["auto_freeze"]["stages_frozen"] == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert summary["freeze_integrity"]["ok"] and summary["freeze_integrity"]["frozen_mid_run"] > 0
    auto = result["arms"]["auto"]
    assert auto["status"] == "completed" and auto["wall_s"]["mean"] > 0
    assert (tmp_path / "s" / "sweep.png").is_file()


def test_seeds_give_mean_and_sd_and_memory_is_measured_per_arm(base, tmp_path):
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"epochs": 1}),
                                  "data": base.data.model_copy(update={"train_size": 8})})
    result = sweep(cfg, tmp_path / "s", _arms(cfg, ("full", "layer4")), seeds=2, prune=False, memory=True, lr_grid=ONE)
    for arm in result["arms"].values():
        assert [s["seed"] for s in arm["seeds"]] == [cfg.seed, cfg.seed + 1]
        assert arm["val_accuracy"]["n"] == 2 and arm["val_accuracy"]["sd"] is not None
        assert arm["wall_s"]["sd"] is not None
    full, fc = result["arms"]["full"], result["arms"]["layer4"]
    assert full["peak_memory_bytes"] > fc["peak_memory_bytes"] > 0  # each in a process of its own
    assert full["memory_kind"] in ("cpu_peak_rss_growth", "cuda_max_allocated")
    assert full["saved_activation_bytes"] > fc["saved_activation_bytes"] > 0
    # The third view: accuracy against peak memory, with a front of its own.
    assert result["memory_pareto"][0] == "layer4" and fc["on_memory_pareto"]
    assert full["on_memory_pareto"] == (full["val_accuracy"]["mean"] > fc["val_accuracy"]["mean"])


# --------------------------------------------------------------------------------------------
# Arms


def test_default_arms_are_full_and_every_freeze_point(base):
    arms = default_arms(base)
    assert [a.name for a in arms] == ["full", "stem", "layer1", "layer2", "layer3", "layer4", "auto"]
    assert arms[0].overrides == {} and arms[3].overrides == {"freeze.until": "layer2"}
    assert arms[-1].overrides == {"freeze.auto": True}


def test_the_auto_arm_keeps_the_configs_own_auto_options(tiny, tmp_path):
    cfg = tiny(freeze__auto__every_steps=2, freeze__auto__max_stage="layer2")
    auto = default_arms(cfg)[-1]
    assert auto.overrides == {"freeze.auto": {"every_steps": 2, "max_stage": "layer2"}}
    made = arm_config(cfg, auto, 0, tmp_path / "r")
    assert made.freeze.auto.every_steps == 2 and made.freeze.auto.max_stage == "layer2" and made.freeze.until is None
    fixed = arm_config(cfg, default_arms(cfg)[1], 0, tmp_path / "s")
    assert fixed.freeze.auto is None  # the fixed arms do not inherit adaptive freezing


def test_arm_config_replaces_the_freeze_spec_and_keeps_batchnorm(tiny, tmp_path):
    cfg = tiny(freeze__trainable="[fc]", freeze__batchnorm="train")
    full = arm_config(cfg, SweepArm("full", "full"), 3, tmp_path / "r")
    assert full.freeze.trainable is None and full.freeze.batchnorm == "train" and full.seed == 3
    deep = arm_config(cfg, SweepArm("layer2", "x", {"freeze.until": "layer2"}), 0, tmp_path / "r")
    assert deep.freeze.until == "layer2" and deep.train.feature_cache == "auto"
    assert deep.output.dir == str(tmp_path / "r") and deep.data == cfg.data


def test_the_sliver_arms_join_only_when_named_each_at_its_own_rate(tiny, tmp_path):
    cfg = tiny(optim__lr=0.03, adapt__method="bias")
    assert {"bn", "bias", "lora-r8"}.isdisjoint(a.name for a in default_arms(cfg))
    picked = merge_arms(default_arms(cfg), [], ["full", "bn", "bias", "lora-r8"], optional_arms(cfg))
    assert [a.name for a in picked] == ["full", "bn", "bias", "lora-r8"]
    bn = arm_config(cfg, picked[1], 0, tmp_path / "bn")
    assert bn.adapt.method == "bn" and bn.optim.lr == 0.3 and bn.freeze.until is None  # 10x the config's
    lora = arm_config(cfg, picked[3], 0, tmp_path / "lora")
    assert lora.adapt.method == "lora" and lora.adapt.lora.rank == 8 and lora.optim.lr == 0.03
    # The user's own adapt.method is, like the freeze selectors, the arm's to decide.
    assert arm_config(cfg, picked[0], 0, tmp_path / "full").adapt.method == "none"
    # An arms-file entry of the same name without overrides takes the built-in, with its own grid.
    entry = SweepArm("bn", "bn", {}, (1.0, 3.0))
    merged = merge_arms(default_arms(cfg), [entry], None, optional_arms(cfg))
    assert merged[-1].overrides == {"adapt.method": "bn", "optim.lr": 0.3} and merged[-1].lr_grid == (1.0, 3.0)
    with pytest.raises(ConfigError, match="the arms are full, .*auto, bn, bias, lora-r8"):
        merge_arms(default_arms(cfg), [], ["full", "lora"], optional_arms(cfg))


def test_block_points_inside_a_stage_are_arms_that_join_when_named(tiny, tmp_path):
    cfg = tiny()
    names = [a.name for a in optional_arms(cfg)]
    assert names[-4:] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]  # a stage's last block is the stage
    picked = merge_arms(default_arms(cfg), [], ["full", "layer2.0", "layer2"], optional_arms(cfg))
    assert [a.name for a in picked] == ["full", "layer2", "layer2.0"]
    block = arm_config(cfg, picked[2], 0, tmp_path / "b")
    assert block.freeze.until == "layer2.0" and block.optim.lr == cfg.optim.lr


def test_shipped_arms_file_makes_valid_configs(tiny, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "sweep" / "resnet18_arms.yaml"
    cfg = tiny(train__epochs=3)
    arms = load_arms_file(path)
    assert {"surgical-layer1", "lp-ft", "layer3-bn-train"} <= {a.name for a in arms}
    for arm in arms:
        arm_config(cfg, arm, 0, tmp_path / arm.name)  # raises on an invalid arm
    assert len(merge_arms(default_arms(cfg), arms)) == 7 + len(arms)


def test_the_sliver_arms_file_makes_valid_configs(tiny, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "sweep" / "digits_sliver_arms.yaml"
    cfg = tiny()
    made = {arm.name: arm_config(cfg, arm, 0, tmp_path / arm.name) for arm in load_arms_file(path)}
    assert made["lora-r4"].adapt.lora.rank == 4 and made["lora-r16"].adapt.lora.rank == 16
    assert made["lora-l34"].freeze.until == "layer2" and made["lora-l34"].adapt.method == "lora"


@pytest.mark.parametrize(("text", "message"), [
    ("- {name: a, overrides: {seed: 3}}", "may not override seed"),
    ("- {name: a, overrides: {train.epochs: 9}}", "may not override train.epochs"),
    ("- {name: a, overrides: {optim.lr_rate: 1}}", "lr_rate"),
    ("- {name: a, overides: {}}", "arm 1: overides"),
    ("- {name: 'a b'}", "must be letters"),
    ("- {name: a}\n- {name: a}", "given twice"),
    ("{name: a}", "non-empty YAML list"),
    ("- {name: a, overrides: [1]", "YAML syntax error"),
])
def test_bad_arms_files_fail_with_one_line(tiny_yaml, tmp_path, cli, text, message):
    arms = tmp_path / "arms.yaml"
    arms.write_text(text)
    result = cli("sweep", "--config", tiny_yaml(), "--lr-grid", "1", "--arms", arms, "--emit", tmp_path / "e")
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_sweep_prints_the_table_and_the_recommendation(tiny_yaml, tmp_path, cli):
    result = cli("sweep", "--config", tiny_yaml(), "--lr-grid", "1", "--only", "full,layer4", "--no-memory",
                 "--no-prune",
                 "--out", tmp_path / "s")
    assert result.exit_code == 0, result.stderr
    assert "recommendation:" in result.stdout and "layer4" in result.stdout
    assert "epoch 1/1" in result.stdout
    assert (tmp_path / "s" / "sweep.json").is_file()
    again = cli("sweep", "--collect", tmp_path / "s")
    assert again.exit_code == 0 and "recommendation:" in again.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "70"], "as a fraction"),
    (["--only", "nope"], "unknown arm(s) nope"),
    (["--only", "full"], "at least two arms"),
    (["--feature-cache", "maybe"], "choose auto, on or off"),
    (["--emit", "E", "--collect", "C"], "only one of --emit, --collect"),
    (["data.val_size=0"], "needs validation data"),
])
def test_bad_sweep_options_fail_with_one_line(tiny_yaml, tmp_path, cli, args, message):
    args = [str(tmp_path / a) if a in ("E", "C") else a for a in args]
    result = cli("sweep", "--config", tiny_yaml(), "--lr-grid", "1", "--no-memory", "--out", tmp_path / "s", *args)
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_or_collect_of_a_folder_that_is_no_sweep(tmp_path, cli):
    for flag in ("--resume", "--collect"):
        result = cli("sweep", flag, tmp_path)
        assert result.exit_code == 2 and "not a sweep folder" in result.stderr


def test_a_new_sweep_over_an_old_one_trains_from_the_start(base, tmp_path):
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"epochs": 1}),
                                  "data": base.data.model_copy(update={"train_size": 8, "val_size": 8}),
                                  "output": base.output.model_copy(update={"overwrite": True})})
    arms = _arms(cfg, ("full", "layer4"))
    sweep(cfg, tmp_path / "s", arms, prune=False, lr_grid=ONE)
    again = _Epochs()
    sweep(cfg, tmp_path / "s", arms, prune=False, reporter=again, lr_grid=ONE)
    assert again.epochs == [("full", 0), ("layer4", 0)]  # nothing taken as already finished


def test_a_frozen_tensor_that_moved_stops_the_sweep(base, tmp_path, monkeypatch):
    from freezetune.errors import FreezeIntegrityError
    from freezetune.training import recipe as recipe_mod

    original = recipe_mod.Recipe.freeze_integrity
    monkeypatch.setattr(recipe_mod.Recipe, "freeze_integrity",
                        lambda self: {**original(self), "ok": False, "changed": ["conv1.weight"]})
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"epochs": 1}),
                                  "data": base.data.model_copy(update={"train_size": 8})})
    with pytest.raises(FreezeIntegrityError, match=r"arm layer[34] seed 0: frozen tensors changed: conv1.weight"):
        sweep(cfg, tmp_path / "s", _arms(cfg, ("layer4", "layer3")), prune=False, lr_grid=ONE)
