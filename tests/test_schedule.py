"""Gradual unfreezing (freeze.schedule) through the real training loop, including resume."""

import json
import os
import signal

import pytest
import torch

from freezetune.config import load_config
from freezetune.training.recipe import Reporter, resume_config, run, setup
from freezetune.training.run_dir import read_jsonl

SCHEDULE = "[{epoch: 1, unfreeze: [layer4], lr_mult: 0.1}, {epoch: 2, unfreeze: [layer3]}]"


def config(tmp_path, name, **extra):
    values = {"model.weights": "none", "data.image_size": 32, "data.batch_size": 8, "data.train_size": 24,
              "data.val_size": 0, "train.epochs": 3, "train.warmup_steps": 0, "device": "cpu",
              "freeze.trainable": "[fc]", "freeze.schedule": SCHEDULE, "optim.scheduler": "cosine",
              "output.dir": str(tmp_path / name), **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_phases_unfreeze_at_their_epochs_with_new_groups(tmp_path):
    summary = run(config(tmp_path, "a"))
    assert [p["epoch"] for p in summary["schedule"]] == [1, 2]
    groups = summary["optimizer"]["groups"]
    assert [g["name"] for g in groups] == ["base", "unfreeze@1", "unfreeze@2"]
    assert [g["lr_mult"] for g in groups] == [1.0, 0.1, 1.0]
    assert groups[1]["params"] == 8_393_728 and groups[2]["params"] == 2_099_712
    integ = summary["freeze_integrity"]
    # still frozen: stem, layer1, layer2 = 30 parameters + 3 buffers in each of 10 frozen BatchNorms
    assert integ["ok"] and integ["checked_when_unfrozen"] == 30 and integ["tensors_checked"] == 60
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["phases"] == 2 and len(ckpt["optimizer"]["param_groups"]) == 3


def test_batchnorm_switches_to_train_mode_only_when_its_layer_unfreezes(tmp_path):
    r = setup(config(tmp_path, "b"))
    from freezetune.freezing.plan import set_train_mode
    from freezetune.training.recipe import apply_phases

    set_train_mode(r.model, r.plan)
    assert not r.model.layer4[0].bn1.training
    apply_phases(r, 1)
    set_train_mode(r.model, r.plan)
    assert r.model.layer4[0].bn1.training and not r.model.layer3[0].bn1.training


class InterruptAt(Reporter):
    """Sends this process SIGINT after step N, like a user's Ctrl-C (the run stops after the step)."""

    def __init__(self, step):
        self.at = step

    def step(self, record):
        if record["step"] == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("stop_at", [3, 5])  # on an unfreeze boundary, and inside an unfrozen epoch
def test_resume_after_unfreeze_restores_freeze_state_and_groups(tmp_path, stop_at):
    full = run(config(tmp_path, "full"))
    part = run(config(tmp_path, "part"), InterruptAt(stop_at))
    assert part["status"] == "interrupted" and part["steps"] == stop_at
    resumed = run(resume_config(tmp_path / "part", []), resume=True)
    a = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")]
    assert a == b  # bit for bit
    assert resumed["optimizer"]["groups"] == full["optimizer"]["groups"]
    assert resumed["freeze_integrity"]["ok"]


def test_schedule_epochs_must_increase(tmp_path):
    from freezetune.errors import ConfigError

    with pytest.raises(ConfigError, match="strictly increasing"):
        config(tmp_path, "x", **{"freeze.schedule": "[{epoch: 2, unfreeze: [layer4]}, {epoch: 1, unfreeze: [fc]}]"})
    with pytest.raises(ConfigError, match="freeze.schedule.0.unfreeze"):
        config(tmp_path, "x", **{"freeze.schedule": "[{epoch: 1, unfreeze: []}]"})


def test_progress_view_says_when_a_phase_starts(tmp_path):
    messages = []

    class Collect(Reporter):
        def message(self, text):
            messages.append(text)

    run(config(tmp_path, "c"), Collect())
    assert any(m.startswith("epoch 1: unfreezing layer4") for m in messages)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["schedule"][1]["unfreeze"] == ["layer3"]
