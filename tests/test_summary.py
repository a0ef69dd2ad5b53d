"""training/summary.py: summary.json built from a RunFacts record, with no live recipe behind it."""

from __future__ import annotations

import json

import pytest
import torch

from freezetune.training.distributed import DistInfo
from freezetune.training.events import Outcome
from freezetune.training.run_dir import RunDir
from freezetune.training.summary import EpochRecord, RunFacts, build_summary

REASONS = dict.fromkeys(["prefix_without_autograd", "fold_batchnorm", "prefix_channels_last", "feature_cache",
                         "channels_last", "compile", "ddp"], "why")
SPEED = {"frozen_prefix": ["conv1"], "prefix_without_autograd": True, "folded_batchnorm": False,
         "prefix_channels_last": False, "feature_cache": {"enabled": True, "reason": "why"}, "precision": "fp32",
         "channels_last": False, "compile": False, "ddp": False, "reasons": REASONS, "folded_prefix_bytes": 0}
EPOCHS = [{"epoch": 0, "seconds": 1.0, "steps": 2, "cached": False, "epoch_seconds": 1.0}]
INTEGRITY = {"ok": True, "tensors_checked": 2, "changed": [], "sha256": "0" * 64, "checked_when_unfrozen": 0,
             "frozen_mid_run": 0, "ranks_ok": [True]}


def _facts(tmp_path, tiny, info=DistInfo(), **extra) -> RunFacts:
    rows = [{"step": 1, "epoch": 0, "loss": 2.5, "step_time_s": 9.0, "lr": 0.1, "batch_size": 4, "warmup": True,
             "cached": False},
            {"step": 2, "epoch": 0, "loss": 2.0, "step_time_s": 0.2, "lr": 0.1, "batch_size": 4, "warmup": False,
             "cached": False},
            {"step": 3, "epoch": 1, "loss": 1.5, "step_time_s": 0.1, "lr": 0.1, "batch_size": 4, "warmup": False,
             "cached": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = torch.nn.Parameter(torch.zeros(3))
    values = dict(
        config=tiny(), info=info, device=torch.device("cpu"), run_dir=RunDir(tmp_path),
        outcome=Outcome(status="completed", val={"accuracy": 0.75, "loss": 0.5}),
        integrity=INTEGRITY, step_times=[9.0, 0.2, 0.1], epochs=EPOCHS, steps=3, epochs_completed=2,
        weights={"source": "random-init", "notice": None, "head_replaced": False},
        params={"total": 3, "trainable": 3, "frozen": 0, "trainable_pct": 100.0,
                "by_module": {"fc": {"total": 3, "trainable": 3, "frozen": 0}}},
        batchnorm="frozen", frozen_batchnorm_layers=4, adapt="none", speed=SPEED,
        cache_bytes=123, cache_on_disk=False, optimizer=torch.optim.SGD([p], lr=0.1), saved_step=3,
        schedule=[], auto_freeze=None,
    )
    return RunFacts(**{**values, **extra})


def test_the_summary_is_built_from_the_facts_and_the_logged_steps(tmp_path, tiny):
    summary = build_summary(_facts(tmp_path, tiny))
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["epochs_completed"] == 2
    assert summary["loss"] == {"first": 2.5, "last": 1.5}  # every logged step, warm-up included
    assert summary["timing"]["steps_timed"] == 2  # warm-up steps are not timed
    assert summary["timing_by_path"]["cached"]["steps_timed"] == 1
    assert summary["timing_by_path"]["uncached"]["steps_timed"] == 1
    assert summary["val"] == {"accuracy": 0.75, "loss": 0.5}
    assert summary["speed"]["feature_cache"] == {"enabled": True, "reason": "why", "bytes": 123, "on_disk": False}
    assert summary["freeze"] == {"batchnorm": "frozen", "frozen_batchnorm_layers": 4, "adapt": "none"}
    assert summary["checkpoint"]["step"] == 3 and summary["freeze_integrity"] == INTEGRITY
    assert summary["optimizer"]["groups"] == [{"name": None, "lr": 0.1, "lr_mult": 1.0, "params": 3}]
    assert summary["run_dir"] == str(tmp_path) and summary["schema_version"] == 1


def test_events_in_an_old_metrics_log_are_not_steps(tmp_path, tiny):
    facts = _facts(tmp_path, tiny)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "auto_freeze", "step": 3, "stage": "stem"}) + "\n")
    assert build_summary(facts)["loss"]["last"] == 1.5


def test_a_rank_other_than_0_reports_only_its_rank_and_integrity(tmp_path, tiny, monkeypatch):
    from freezetune.training import distributed

    monkeypatch.setattr(distributed, "gather", lambda obj, info: [obj])
    summary = build_summary(_facts(tmp_path, tiny, info=DistInfo(rank=1, world_size=2)))
    assert summary == {"rank": 1, "freeze_integrity": INTEGRITY}


@pytest.mark.parametrize("extra", [{}, {"schema_version": 9, "new_key": 1}])
def test_epoch_records_read_back_ignoring_keys_of_newer_versions(extra):
    record = EpochRecord(epoch=0, step=4, steps=4, train_s=1.0, cached=False, val_accuracy=0.5, val_loss=1.0,
                         val_s=0.1)
    back = EpochRecord.from_dict({**record.as_dict(), **extra})
    assert back.epoch == 0 and back.val_accuracy == 0.5 and back.complete


@pytest.mark.parametrize(("wait", "train", "bound"), [
    (0.25, 1.0, True), (0.2, 1.0, False),  # over a fifth of the training time, not at it
    (0.0, 1.0, False), (0.0, 0.0, False),
])
def test_data_feed_is_input_bound_above_a_fifth_of_the_training_time(wait, train, bound):
    from freezetune.training.summary import data_feed

    steps = [{"batch_size": 4, "data_wait_s": wait / 2}, {"batch_size": 4, "data_wait_s": wait / 2}]
    feed = data_feed(steps, [{"train_s": train}], "auto", 0, "cpu")
    assert feed["input_bound"] is bound and feed["samples"] == 8
    assert feed["wait_share"] == (wait / train if train else None)
    assert feed["end_to_end_samples_per_s"] == (8 / train if train else None)
    assert (feed["notice"] is not None) is bound
    assert feed["num_workers"] == 0 and feed["num_workers_setting"] == "auto"


def test_the_input_bound_notice_offers_what_helps_on_the_device():
    from freezetune.training.summary import input_bound_notice

    cpu = input_bound_notice(0.5, 0, "auto", "cpu")
    gpu = input_bound_notice(0.5, 3, 4, "cuda")
    assert cpu.startswith("input-bound: 50% of the training time")
    assert "(0 loader workers from data.num_workers: auto)" in cpu
    assert "more data.num_workers" not in cpu and "compete with a CPU step" in cpu
    assert "more data.num_workers" in gpu and "(3 loader workers)" in gpu
    assert all("feature cache" in line for line in (cpu, gpu))


def test_older_step_rows_without_a_data_wait_count_as_none():
    from freezetune.training.summary import data_feed

    feed = data_feed([{"batch_size": 4}], [{"train_s": 2.0}], 0, 0)
    assert feed["wait_s"] == 0.0 and feed["end_to_end_samples_per_s"] == 2.0
