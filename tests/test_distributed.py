"""torchrun + DDP on CPU with the gloo backend and two processes."""

import json
import os
import subprocess
import sys

import pytest

from freezetune.training.run_dir import read_jsonl

pytestmark = pytest.mark.heavy(80)

COMMON = ["model.weights=none", "data.image_size=32", "data.train_size=32", "data.val_size=8",
          "train.epochs=2", "train.warmup_steps=1", "freeze.trainable=[fc]", "device=cpu"]


def torchrun(out, *extra, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FREEZETUNE_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "freezetune", "train", "-c", "configs/quickstart.yaml", *COMMON, f"output.dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_ranks_match_one_process_with_the_same_global_batch_and_share_the_feature_cache(tmp_path, cli):
    # fc only: the frozen prefix is the whole backbone, cached with feature_cache on.
    proc = torchrun(tmp_path / "ddp", "data.batch_size=4", "train.feature_cache=on")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = torchrun(tmp_path / "ddp-plain", "data.batch_size=4")  # feature_cache off, the default
    assert plain.returncode == 0, plain.stderr[-2000:]
    # The single process is this one (one torch thread, as each rank has).
    single = cli("train", "-c", "configs/quickstart.yaml", *COMMON, "data.batch_size=8",
                 f"output.dir={tmp_path / 'one'}")
    assert single.exit_code == 0, single.output[-2000:]
    rows = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("ddp", "ddp-plain", "one")}
    # After the filling epoch every rank holds the whole cache (each was dealt half the samples):
    # the second epoch's steps read cached features on both ranks.
    assert [r["cached"] for r in rows["ddp"]] == [False] * 4 + [True] * 4
    assert not any(r["cached"] for r in rows["ddp-plain"])
    # Rank 0 logs the mean loss over ranks; with equal shards that is the single-process loss,
    # and the cached run's equals the uncached one's.
    losses = {name: [r["loss"] for r in found] for name, found in rows.items()}
    assert len(losses["ddp"]) == len(losses["one"]) == 8
    assert losses["ddp"] == pytest.approx(losses["ddp-plain"], rel=1e-5, abs=1e-6)
    assert losses["ddp-plain"] == pytest.approx(losses["one"], rel=1e-5, abs=1e-6)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["speed"]["feature_cache"]["enabled"]
    assert summary["distributed"]["world_size"] == 2
    assert len(summary["distributed"]["timing_per_rank"]) == 2
    assert summary["freeze_integrity"]["ranks_ok"] == [True, True]
    assert proc.stdout.count("Run summary") == 1  # only rank 0 prints


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_unfreeze_phase_rebuilds_ddp(tmp_path):
    proc = torchrun(tmp_path / "sched", "data.batch_size=4", "freeze.schedule=[{epoch: 1, unfreeze: [layer4]}]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "sched" / "summary.json").read_text())
    assert summary["schedule"][0]["params"] == 8_393_728 and summary["freeze_integrity"]["ok"]
    assert summary["steps"] == 8


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_auto_freeze_rewraps_ddp_and_every_rank_agrees(tmp_path):
    # layer1's blocks freeze after step 4 (checks every 2 steps); DDP built for layer1 + fc would then wait
    # forever for layer1's gradients, so the run only finishes if it was re-wrapped.
    proc = torchrun(tmp_path / "auto", "data.batch_size=4", "train.epochs=3", "freeze.trainable=[layer1,fc]",
                    "freeze.auto.criterion=threshold", "freeze.auto.threshold=1e9", "freeze.auto.every_steps=2",
                    "freeze.auto.min_steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert [e["stage"] for e in summary["auto_freeze"]["events"]] == ["layer1.0", "layer1.1"]
    assert summary["freeze_integrity"]["ranks_ok"] == [True, True] and summary["steps"] == 12
    assert "froze layer1.0" in proc.stdout and "froze layer1.1" in proc.stdout
