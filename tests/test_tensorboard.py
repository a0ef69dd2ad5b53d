"""output.tensorboard: event files read back with tensorboard's own EventAccumulator match metrics.jsonl."""

import json
import sys

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from freezetune.training.run_dir import read_jsonl  # noqa: E402
from freezetune.training.tensorboard import TENSORBOARD_DIR, group_lrs, hparam_values  # noqa: E402

SCHEDULE = "[{epoch: 1, unfreeze: [layer4], lr_mult: 0.1}]"


def accumulate(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, tiny_at):
    from freezetune.training.recipe import run

    out = tmp_path_factory.mktemp("tb") / "run"
    cfg = tiny_at(out, output__tensorboard="true", train__epochs=2, train__warmup_steps=0,
                  freeze__trainable="[fc]", freeze__schedule=SCHEDULE, data__val_size=8)
    summary = run(cfg)
    return out, summary


def test_loss_step_time_and_samples_per_s_match_metrics_jsonl(tb_run):
    out, _ = tb_run
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r]
    acc = accumulate(out / TENSORBOARD_DIR)
    loss, time_s, rate = (scalars(acc, t) for t in ("train/loss", "train/step_time_s", "train/samples_per_s"))
    assert sorted(loss) == [r["step"] for r in rows]
    for r in rows:
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # stored as float32
        assert time_s[r["step"]] == pytest.approx(r["step_time_s"], rel=1e-6)
        assert rate[r["step"]] == pytest.approx(r["batch_size"] / r["step_time_s"], rel=1e-5)


def test_learning_rate_per_param_group_including_one_added_by_unfreezing(tb_run):
    out, _ = tb_run
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r}
    acc = accumulate(out / TENSORBOARD_DIR)
    lr_tags = [t for t in acc.Tags()["scalars"] if t.startswith("train/lr/")]
    assert len(lr_tags) == 2, lr_tags  # the head's group, and layer4's from the second epoch
    base = scalars(acc, lr_tags[0]) if len(scalars(acc, lr_tags[0])) == len(rows) else scalars(acc, lr_tags[1])
    for step, value in base.items():
        assert value == pytest.approx(rows[step]["lr"], rel=1e-6)
    added = next(scalars(acc, t) for t in lr_tags if len(scalars(acc, t)) < len(rows))
    assert min(added) > 1 and all(v == pytest.approx(rows[s]["lr"] * 0.1, rel=1e-5) for s, v in added.items())


def test_validation_per_epoch_and_the_unfreeze_event_as_text(tb_run):
    out, _ = tb_run
    epochs = read_jsonl(out / "epochs.jsonl")
    acc = accumulate(out / TENSORBOARD_DIR)
    val = scalars(acc, "val/accuracy")
    assert val == pytest.approx({e["step"]: e["val_accuracy"] for e in epochs}, rel=1e-6)
    assert scalars(acc, "val/loss") == pytest.approx({e["step"]: e["val_loss"] for e in epochs}, rel=1e-6)
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("events/text_summary")]
    assert any("unfreezing layer4" in t for t in texts), texts


def test_hyperparameters_go_in_with_the_final_metrics(tb_run):
    out, summary = tb_run
    acc = accumulate(out / TENSORBOARD_DIR)
    assert scalars(acc, "hparam/val_accuracy") == {summary["steps"]: pytest.approx(summary["val"]["accuracy"])}
    plugin = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugin and "_hparams_/session_start_info" in plugin


def test_hparam_values_are_what_tensorboard_accepts(tiny):
    values = hparam_values(tiny(freeze__trainable="[layer4,fc]"), {"status": "completed"})
    assert values["freeze.trainable"] == json.dumps(["layer4", "fc"])
    assert values["output.overwrite"] == "false" and values["status"] == "completed"
    assert "output.dir" not in values
    assert all(isinstance(v, int | float | str) for v in values.values())


def test_unnamed_and_duplicate_groups_get_distinct_names():
    class Opt:
        param_groups = [{"lr": 0.1}, {"lr": 0.2, "name": "a"}, {"lr": 0.3, "name": "a"}]

    assert group_lrs(Opt()) == {"group0": 0.1, "a": 0.2, "a#2": 0.3}


def test_without_the_tensorboard_package_it_is_one_line(tmp_path, tiny_yaml, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = cli("train", "--config", tiny_yaml(output__tensorboard="true", train__max_steps=1))
    assert result.exit_code == 2
    assert "pip install 'freezetune[tensorboard]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
