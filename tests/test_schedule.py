"""Gradual unfreezing (freeze.schedule) through the real training loop, including resume."""

import json
import os
import signal

import pytest
import torch

from freezetune.training.recipe import Recipe, Reporter, resume_config, run
from freezetune.training.run_dir import read_jsonl

SCHEDULE = "[{epoch: 1, unfreeze: [layer4], lr_mult: 0.1}, {epoch: 2, unfreeze: [layer3]}]"


# Three epochs of three batches, fc training until the schedule unfreezes layer4, then layer3.
SCHEDULED = {"data.batch_size": 8, "data.train_size": 24, "data.val_size": 0, "train.epochs": 3,
             "train.warmup_steps": 0, "freeze.trainable": "[fc]", "freeze.schedule": SCHEDULE,
             "optim.scheduler": "cosine"}


@pytest.fixture
def config(tmp_path, tiny_at):
    """``config(name, **extra)``: the scheduled tiny config, writing to ``tmp_path / name``."""

    def make(name, **extra):
        return tiny_at(tmp_path / name, **{k.replace(".", "__"): v for k, v in {**SCHEDULED, **extra}.items()})

    return make


def test_phases_unfreeze_at_their_epochs_with_new_groups(tmp_path, config):
    summary = run(config("a"))
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


def test_batchnorm_switches_to_train_mode_only_when_its_layer_unfreezes(tmp_path, config):
    r = Recipe(config("b")).setup()
    from freezetune.freezing.plan import set_train_mode

    set_train_mode(r.model, r.plan)
    assert not r.model.layer4[0].bn1.training
    r.freeze.apply_phases(1)
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
def test_resume_after_unfreeze_restores_freeze_state_and_groups(tmp_path, config, stop_at):
    full = run(config("full"))
    part = run(config("part"), InterruptAt(stop_at))
    assert part["status"] == "interrupted" and part["steps"] == stop_at
    resumed = run(resume_config(tmp_path / "part", []), resume=True)
    a = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")]
    assert a == b  # bit for bit
    assert resumed["optimizer"]["groups"] == full["optimizer"]["groups"]
    assert resumed["freeze_integrity"]["ok"]


def test_schedule_epochs_must_increase(tmp_path, config):
    from freezetune.errors import ConfigError

    with pytest.raises(ConfigError, match="strictly increasing"):
        config("x", **{"freeze.schedule": "[{epoch: 2, unfreeze: [layer4]}, {epoch: 1, unfreeze: [fc]}]"})
    with pytest.raises(ConfigError, match="freeze.schedule.0.unfreeze"):
        config("x", **{"freeze.schedule": "[{epoch: 1, unfreeze: []}]"})


def test_progress_view_says_when_a_phase_starts(tmp_path, config):
    messages = []

    class Collect(Reporter):
        def message(self, text):
            messages.append(text)

    run(config("c"), Collect())
    assert any(m.startswith("epoch 1: unfreezing layer4") for m in messages)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["schedule"][1]["unfreeze"] == ["layer3"]


def test_a_tensor_that_moved_while_frozen_fails_its_phase(config):
    # layer4 is frozen until epoch 1; a tensor of it that changes before then is a bug, and the
    # phase that would unfreeze it refuses to, naming it.
    from freezetune.errors import FreezeIntegrityError

    recipe = Recipe(config("moved")).setup()
    try:
        recipe.start_training()
        recipe.train_epoch()  # epoch 0: fc alone trains
        with torch.no_grad():
            recipe.model.layer4[0].conv1.weight.add_(1e-3)
        moved = r"changed while frozen, before epoch 1: .*layer4\.0\.conv1\.weight"
        with pytest.raises(FreezeIntegrityError, match=moved):
            recipe.train_epoch()
    finally:
        recipe.cleanup()
