"""``freezetune sweep --backend ray``: trials on a local Ray instance with 2 CPUs, against the in-process sweep.

One Ray instance serves every test here (the module-scoped ``ray_cluster``), and the tests share
one xdist worker (``--dist loadscope``), so Ray starts once.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest

from freezetune.errors import RunsFailedError
from freezetune.sweep import default_arms, merge_arms, resume, sweep
from freezetune.sweep.halving import HALVING_RULE
from freezetune.sweep.ray_tune import RayOptions

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.heavy(140)

GRID = (0.25, 4.0)  # 2 arms x 2 rates: the 4 runs of the issue, and halving keeps one rate of each arm
RAY = RayOptions(cpus_per_trial=1, max_concurrent=2)


@pytest.fixture(scope="module")
def ray_cluster():
    # Module-scoped: Ray's own processes keep polling while it is up, so it stops with the last
    # test here instead of slowing the rest of the session on this worker.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tiny_at, tmp_path_factory):
    # 4 epochs of one step: the halving rung after epoch 3, the safe rule's after 2 and 3; a
    # tolerance so wide that no whole arm stops.
    root = tmp_path_factory.mktemp("ray")
    return tiny_at(root / "run", train__epochs=4, data__train_size=4, data__val_size=16)


def _arms(cfg):
    return merge_arms(default_arms(cfg), [], ["full", "layer4"])


def _outcome(result):
    return {(name, r["multiplier"]): (r["status"], r["pruned_at_epoch"], r["seeds"][0]["val_accuracy_by_epoch"])
            for name, arm in result["arms"].items() for r in arm["lr_grid"]}


class _Log:
    def __init__(self, interrupt_after: int | None = None):
        self.epochs, self.stops, self.interrupt_after = [], [], interrupt_after

    def start(self, *args):
        pass

    def epoch(self, arm, seed, record, epochs):
        self.epochs.append((arm, record.epoch))
        if len(self.epochs) == self.interrupt_after:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the driver, where Tune handles it

    def pruned(self, arm, epoch, why=""):
        self.stops.append((arm, epoch, why == HALVING_RULE))

    def message(self, text):
        pass


@pytest.fixture(scope="module")
def in_process(config, tmp_path_factory):
    """The same sweep in this process: what every Ray sweep here must equal."""
    out = tmp_path_factory.mktemp("ray-inproc") / "s"
    log = _Log()
    return sweep(config, out, _arms(config), tolerance=0.99, memory=False, lr_grid=GRID, reporter=log), log


def test_trials_overlap_halve_as_in_process_and_equal_its_accuracies(ray_cluster, config, in_process, tmp_path):
    expected, expected_log = in_process
    log = _Log()
    result = sweep(config, tmp_path / "s", _arms(config), tolerance=0.99, memory=False, lr_grid=GRID,
                   ray=RAY, reporter=log)
    assert result["mode"] == "ray"
    # Every run's per-epoch accuracies, status and rung equal the in-process sweep's (halving
    # stopped the same rates after the same epoch), and so does each arm's best rate.
    assert _outcome(result) == _outcome(expected)
    assert sorted(log.stops) == sorted(expected_log.stops)
    assert {n: a["lr_multiplier"] for n, a in result["arms"].items()} == \
        {n: a["lr_multiplier"] for n, a in expected["arms"].items()}
    runs = [s for arm in result["arms"].values() for r in arm["lr_grid"] for s in r["seeds"]]
    pruned = next(s for s in runs if s["status"] == "pruned")
    summary = json.loads((tmp_path / "s" / pruned["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "pruned" and "compete at rungs" in summary["error"]
    # Two trials ran at once: their recorded intervals overlap.
    spans = sorted((s["started_at"], s["ended_at"]) for s in runs)
    assert all(start < end for start, end in spans)
    assert any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1))


def test_ctrl_c_then_resume_retrains_no_finished_epoch_and_equals_the_straight_sweep(
        ray_cluster, config, in_process, tmp_path):
    expected, _ = in_process
    log = _Log(interrupt_after=6)  # some epochs done, some trials waiting at a rung
    stopped = sweep(config, tmp_path / "s", _arms(config), tolerance=0.99, memory=False, lr_grid=GRID, ray=RAY,
                    reporter=log)
    assert stopped["status"] == "interrupted"
    done_before = _epochs_on_disk(tmp_path / "s")
    assert sum(done_before.values()) >= 6
    again = _Log()
    resumed = resume(tmp_path / "s", again)
    assert _outcome(resumed) == _outcome(expected)
    # An epoch reported again would be an epoch trained again; a run interrupted mid-epoch
    # redoes only the epoch it had not finished.
    redone = [(arm, epoch) for arm, epoch in again.epochs if epoch < done_before.get(arm, 0)]
    assert redone == []


def _epochs_on_disk(out) -> dict[str, int]:
    """Per run label (``full x0.25``), the epochs its epochs.jsonl holds."""
    counts = {}
    for path in (out / "runs").glob("*/*/seed-0/epochs.jsonl"):
        arm, rate = path.parts[-4], path.parts[-3]
        counts[f"{arm} {rate}"] = len(path.read_text().splitlines())
    return counts


def test_a_trial_that_raises_is_named_and_the_others_complete(ray_cluster, config, tmp_path, cli, monkeypatch):
    # Weights from a path relative to where the sweep starts: a trial runs where the sweep was started.
    import torch
    from safetensors.torch import save_file

    from freezetune.models.weights import build_model

    torch.manual_seed(0)
    save_file(build_model(config.model.model_copy(update={"weights": "none"})).model.state_dict(),
              str(tmp_path / "start.safetensors"))
    monkeypatch.chdir(tmp_path)
    cfg = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1}),
                                    "model": config.model.model_copy(update={"weights": "start.safetensors"})})

    class Break(_Log):
        def start(self, *args):  # the jobs are written: break one of them before the trials start
            (tmp_path / "s" / "configs" / "layer4" / "seed-0.yaml").write_text("data: {image_size: -1}\n")

    with pytest.raises(RunsFailedError, match=r"1 of 2 runs failed, first layer4 seed 0: .*image_size"):
        sweep(cfg, tmp_path / "s", _arms(cfg), memory=False, lr_grid=(1.0,), prune="off", ray=RAY, reporter=Break())
    written = json.loads((tmp_path / "s" / "sweep.json").read_text())
    arms = written["arms"]
    assert arms["layer4"]["status"] == "failed" and "image_size" in arms["layer4"]["seeds"][0]["error"]
    assert arms["full"]["status"] == "completed" and written["recommendation"]["arm"] == "full"
    # The failure is the sweep's record of that run: collecting the folder reads it back.
    result = cli("sweep", "--collect", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["arms"]["layer4"]["status"] == "failed"


def test_without_ray_the_backend_is_one_line_with_the_pip_command(tiny_yaml, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray then raises ImportError
    result = cli("sweep", "--config", tiny_yaml(), "--backend", "ray", "--lr-grid", "1")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "Ray Tune" in line and "pip install 'freezetune[ray]'" in line


def test_ray_options_need_the_ray_backend(tiny_yaml, cli):
    result = cli("sweep", "--config", tiny_yaml(), "--max-concurrent", "2")
    assert result.exit_code == 2 and "--max-concurrent needs --backend ray" in result.stderr
