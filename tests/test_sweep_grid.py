"""The sweep's learning-rate grid end to end on tiny data: every (arm, rate) a real run, halving, collect."""

from __future__ import annotations

import json
import signal

import pytest

from freezetune.config import load_config
from freezetune.sweep import collect, default_arms, emit, merge_arms, resume, sweep
from freezetune.sweep.halving import HALVING_RULE
from freezetune.sweep.jobs import read_manifest
from freezetune.training.recipe import run

pytestmark = pytest.mark.heavy(50)

GRID = (0.5, 4.0)


def _arms(cfg, names=("full", "layer4")):
    return merge_arms(default_arms(cfg), [], list(names))


def _accuracies(run_dir) -> list[float]:
    return [json.loads(line)["val_accuracy"] for line in (run_dir / "epochs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gridded(tmp_path_factory, tiny_at):
    """One unpruned sweep of full and fc only, each at half and four times the config's rate."""
    root = tmp_path_factory.mktemp("grid")
    cfg = tiny_at(root / "run", train__epochs=2, data__train_size=12, data__val_size=16)
    out = root / "out"
    return cfg, out, sweep(cfg, out, _arms(cfg), prune="off", memory=False, lr_grid=GRID)


def test_every_rate_is_a_run_that_equals_train_of_its_config_exactly(gridded, tmp_path):
    cfg, out, result = gridded
    manifest = read_manifest(out)
    assert sorted((j.arm, j.lr_multiplier) for j in manifest.jobs) == [
        ("full", 0.5), ("full", 4.0), ("layer4", 0.5), ("layer4", 4.0)]
    for job in manifest.jobs:
        assert job.run_dir == f"runs/{job.arm}/x{job.lr_multiplier:g}/seed-0"
        job_cfg = load_config(out / job.config, [f"output.dir={tmp_path / job.run_dir}"])
        assert job_cfg.optim.lr == pytest.approx(cfg.optim.lr * job.lr_multiplier)
        run(job_cfg)
        rate = next(r for r in result["arms"][job.arm]["lr_grid"] if r["multiplier"] == job.lr_multiplier)
        assert _accuracies(tmp_path / job.run_dir) == rate["seeds"][0]["val_accuracy_by_epoch"]


def test_each_arm_is_reported_at_its_best_rate_with_the_others_listed(gridded):
    cfg, out, result = gridded
    assert result["lr_grid"] == list(GRID) and "best learning rate" in result["selection"]
    for arm in result["arms"].values():
        finals = {r["multiplier"]: r["val_accuracy"]["mean"] for r in arm["lr_grid"]}
        assert arm["val_accuracy"]["mean"] == max(finals.values())
        assert finals[arm["lr_multiplier"]] == max(finals.values())
        assert arm["lr"] == pytest.approx(cfg.optim.lr * arm["lr_multiplier"])
        assert arm["lr_edge"] == ("low" if arm["lr_multiplier"] == GRID[0] else "high")  # two rates: always an edge
        assert arm["sweep_train_s"] == pytest.approx(sum(r["wall_s"]["mean"] for r in arm["lr_grid"]))
    rec = result["recommendation"]
    pick = result["arms"][rec["arm"]]
    assert rec["lr"] == pick["lr"] and f"at lr {pick['lr']:g}" in rec["reason"]
    # The recommended arm's config has the recommended rate.
    assert load_config(rec["config"]).optim.lr == pytest.approx(rec["lr"])
    header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
    # Newer columns come after the older ones, which readers index.
    assert header[-5:] == ["lr", "lr_multiplier", "best_rate", "saved_activation_bytes", "on_memory_pareto"]
    assert result["runs_train_s"] > 0 and result["overhead"] >= 1.0


def test_emit_writes_every_rate_with_its_threads_and_collect_picks_the_best(gridded, tmp_path, cli):
    cfg, _, inline = gridded
    threaded = emit(cfg, tmp_path / "threaded", _arms(cfg), lr_grid=GRID, job_threads=1)
    for job in threaded.jobs:  # two jobs side by side on two cores do not oversubscribe them
        assert load_config(tmp_path / "threaded" / job.config).train.threads == 1
    # Bit for bit against the in-process sweep needs the same thread count (it sums in another order).
    manifest = emit(cfg, tmp_path / "jobs", _arms(cfg), lr_grid=GRID)
    lines = (tmp_path / "jobs" / "jobs.txt").read_text().splitlines()
    assert len(lines) == len(manifest.jobs) == 4
    for line in lines:
        assert cli(*line.split()[1:]).exit_code == 0
    collected = collect(tmp_path / "jobs")
    for name, arm in collected["arms"].items():
        assert arm["lr_multiplier"] == inline["arms"][name]["lr_multiplier"]
        assert arm["seeds"][0]["val_accuracy_by_epoch"] == inline["arms"][name]["seeds"][0]["val_accuracy_by_epoch"]


def test_cli_lr_grid_and_tolerance_in_points(tiny_yaml, tmp_path, cli):
    result = cli("sweep", "--config", tiny_yaml(), "--only", "full,layer4", "--lr-grid", "0.5,2x", "--prune", "off",
                 "--tolerance", "99", "--no-memory", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert record["tolerance"] == pytest.approx(0.99) and record["lr_grid"] == [0.5, 2.0]
    # Within 99 points every arm is eligible, so the pick is the cheaper: fc only (cached), not full.
    assert record["recommendation"]["eligible"] == ["full", "layer4"] and record["recommendation"]["arm"] == "layer4"
    assert f"recommendation: layer4 at lr {record['recommendation']['lr']:g}" in " ".join(result.stdout.split())


@pytest.mark.parametrize(("args", "message"), [
    (["--lr-grid", "0.1,abc"], "'abc' is not a number"),
    (["--lr-grid", "0,1"], "positive multipliers"),
    (["--prune", "sometimes"], "choose off, safe, halving"),
])
def test_bad_grid_or_prune_options_fail_with_one_line(tiny_yaml, tmp_path, cli, args, message):
    result = cli("sweep", "--config", tiny_yaml(), "--out", tmp_path / "s", *args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_arms_file_grid_replaces_the_sweeps_for_that_arm(tiny, tmp_path, cli):
    from freezetune.sweep.arms import load_arms_file

    path = tmp_path / "arms.yaml"
    path.write_text("- {name: probe, overrides: {freeze.trainable: [fc]}, lr_grid: [10, 30]}\n")
    arms = merge_arms(default_arms(tiny()), load_arms_file(path), ["full", "probe"])
    manifest = emit(tiny(), tmp_path / "e", arms, lr_grid=(1.0,))
    assert manifest.grid("probe") == [10.0, 30.0] and manifest.grid("full") == [1.0]
    assert [j.run_dir for j in manifest.jobs if j.arm == "full"] == ["runs/full/seed-0"]  # one rate: no rate level


# --------------------------------------------------------------------------------------------
# Halving: real runs, and the same decisions after a resume


class _Log:
    def __init__(self):
        self.epochs, self.stops = [], []

    def start(self, *args):
        pass

    def epoch(self, arm, seed, record, epochs):
        self.epochs.append((arm, record.epoch))

    def pruned(self, arm, epoch, why=""):
        self.stops.append((arm, epoch, why == HALVING_RULE))

    def message(self, text):
        pass


def _halving_config(tiny_at, root):
    # 4 epochs of one step: one halving rung, after epoch 3; a tolerance so wide that no whole arm stops.
    return tiny_at(root / "run", train__epochs=4, data__train_size=4, data__val_size=16)


def _outcome(result):
    return {(name, r["multiplier"]): (r["status"], r["pruned_at_epoch"], r["seeds"][0]["val_accuracy_by_epoch"])
            for name, arm in result["arms"].items() for r in arm["lr_grid"]}


def test_halving_stops_all_but_the_best_rate_and_a_resume_decides_the_same(tiny_at, tmp_path, monkeypatch):
    from freezetune.training import loop as loop_mod

    cfg = _halving_config(tiny_at, tmp_path)
    grid, arms = (0.25, 1.0, 4.0), _arms(cfg)
    log = _Log()
    straight = sweep(cfg, tmp_path / "a", arms, tolerance=0.99, memory=False, lr_grid=grid, reporter=log)
    outcome = _outcome(straight)
    for name in ("full", "layer4"):
        statuses = sorted(outcome[(name, m)][0] for m in grid)
        assert statuses == ["completed", "pruned", "pruned"]  # 3 rates -> 1 after the first rung
        assert all(outcome[(name, m)][1] == 3 for m in grid if outcome[(name, m)][0] == "pruned")
    assert sorted(log.stops) == sorted((f"{n} x{m:g}", 3, True) for (n, m), o in outcome.items() if o[0] == "pruned")
    pruned = next(r for r in straight["arms"]["full"]["lr_grid"] if r["status"] == "pruned")
    summary = json.loads((tmp_path / "a" / pruned["seeds"][0]["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "pruned" and "compete at rungs" in summary["error"]

    # The same sweep, Ctrl-C'd in the fifth round of epochs (after the rung), then resumed.
    calls, original = {"n": 0}, loop_mod.TrainingLoop._step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6 * 3 + 1 + 1:  # 1 step an epoch: rounds 1-3 of 6 runs, then the 2nd run of round 4
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loop_mod.TrainingLoop, "_step", step)
    assert sweep(cfg, tmp_path / "b", arms, tolerance=0.99, memory=False, lr_grid=grid)["status"] == "interrupted"
    monkeypatch.setattr(loop_mod.TrainingLoop, "_step", original)
    resumed = resume(tmp_path / "b")
    assert _outcome(resumed) == outcome
    assert {n: a["lr_multiplier"] for n, a in resumed["arms"].items()} == \
        {n: a["lr_multiplier"] for n, a in straight["arms"].items()}
