"""The recipe is the one training loop: ``compare`` arms train exactly the steps ``train`` does."""

from __future__ import annotations

import pytest

from freezetune import compare
from freezetune.atomic import write_json
from freezetune.training.recipe import EpochEnd, Recipe, StepRecord, run
from freezetune.training.run_dir import read_jsonl
from freezetune.training.state import RunState, StopReason

# 16 images in batches of 4: 4 steps an epoch, so 8 steps cross into a second epoch.
SCHEDULES = {
    "warmup": {"optim.warmup_steps": 1000},  # lr ~ 1e-5: the bug compare used to have (full lr)
    "cosine": {"optim.scheduler": "cosine", "optim.warmup_steps": 2, "train.epochs": 2},
    "unfreeze phase": {
        "freeze.until": "layer3", "freeze.trainable": "null", "train.epochs": 2, "optim.scheduler": "cosine",
        "freeze.schedule": "[{epoch: 1, unfreeze: [layer3], lr_mult: 0.5}]",
    },
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_compare_frozen_arm_trains_the_same_steps_as_train(tiny, name):
    settings = {"freeze.trainable": "[layer4, fc]", "optim.lr": 0.05, **SCHEDULES[name]}
    cfg = tiny(**{k.replace(".", "__"): v for k, v in settings.items()})
    steps = 8 if cfg.train.epochs == 2 else 4
    summary = run(cfg)
    trained = [r["loss"] for r in read_jsonl(summary["run_dir"] + "/metrics.jsonl")]
    assert len(trained) == steps
    if name == "unfreeze phase":
        assert summary["schedule"][0]["unfreeze"] == ["layer3"]

    out = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": summary["run_dir"] + "-cmp"})})
    result = compare.frozen_vs_full(out, steps=steps - 1, warmup=1, memory=False, modes=("optimized",))
    compared = result["arms"]["frozen"]["losses"]
    assert compared == pytest.approx(trained, abs=1e-6, rel=0)
    # Tensors a phase unfroze were checked when unfrozen; the rest are still bit-identical.
    assert result["arms"]["frozen"]["freeze_integrity"]["ok"], result["arms"]["frozen"]["freeze_integrity"]


def test_loop_yields_steps_then_the_epoch_end_and_stops_completed(tiny):
    recipe = Recipe(tiny(freeze__trainable="[fc]", data__val_size=0)).setup()
    events = list(recipe.loop())
    assert [type(e) for e in events] == [StepRecord] * 4 + [EpochEnd]
    assert [e.step for e in events[:4]] == [1, 2, 3, 4]
    assert events[-1].steps == 4 and recipe.stop_reason is StopReason.COMPLETED
    assert recipe.state == RunState(step=4, epoch=1, batch_in_epoch=0, phases=0)


def test_extend_to_runs_past_the_configs_own_length(tiny):
    recipe = Recipe(tiny(freeze__trainable="[fc]", data__val_size=0)).setup()
    recipe.extend_to(6)
    steps = [e for e in recipe.loop() if isinstance(e, StepRecord)]
    assert len(steps) == 6 and recipe.state.epoch == 1 and recipe.state.batch_in_epoch == 2


def test_nonfinite_loss_stops_the_loop_without_counting_the_step(tiny):
    # lr 1e38: step 1 is finite but its update overflows the logits, so step 2's loss is NaN.
    recipe = Recipe(tiny(freeze__trainable="[fc]", optim__lr="1.0e+38", data__val_size=0)).setup()
    steps = [e for e in recipe.loop() if isinstance(e, StepRecord)]
    assert recipe.stop_reason is StopReason.NONFINITE
    assert recipe.state.step == len(steps) < 4


def test_run_state_round_trips_through_a_checkpoint_dict():
    state = RunState(step=7, epoch=1, batch_in_epoch=3, phases=1)
    assert RunState.from_checkpoint({"model": {}, **state.as_dict()}) == state
    assert RunState.from_checkpoint({"step": 2}) == RunState(step=2)  # older checkpoints lack phases


def test_summary_is_a_typed_record_with_a_schema_version(tiny, tmp_path):
    summary = run(tiny(freeze__trainable="[fc]"))
    assert summary["schema_version"] == 1
    assert summary["speed"]["reasons"]["prefix_without_autograd"].startswith("stem..layer4 is frozen")
    write_json(tmp_path / "s.json", summary)  # plain data all the way down
