import csv
import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_overrides
from freezetune import compare
from freezetune.cli import app
from freezetune.config import load_config
from freezetune.errors import ConfigError

TOP_KEYS = ("speedup", "freeze_integrity", "device", "versions", "fairness", "arms")
ARM_PATHS = (
    ("params", "trainable"), ("params", "frozen"), ("flops_per_step",), ("timing", "step_median_s"),
    ("timing", "step_p10_s"), ("timing", "step_p90_s"), ("memory", "peak_bytes"), ("optimizer_state_bytes",),
    ("loss", "first"), ("loss", "last"),
)


def dig(d, path):
    for key in path:
        assert key in d, f"missing {'.'.join(path)}"
        d = d[key]
    return d


# ---- arms and schedule ------------------------------------------------------------------------


def test_schedule_alternates_arms_in_blocks():
    assert compare.schedule(["full", "frozen"], 5, 2) == [
        ("full", 2), ("frozen", 2), ("full", 2), ("frozen", 2), ("full", 1), ("frozen", 1),
    ]


@pytest.mark.parametrize("steps,block", [(1, 1), (7, 3), (10, 10), (4, 9)])
def test_schedule_gives_every_arm_all_its_steps(steps, block):
    names = ["full", "stem", "layer4"]
    turns = compare.schedule(names, steps, block)
    assert [name for name, _ in turns] == names * (len(turns) // len(names))
    for name in names:
        assert sum(n for arm, n in turns if arm == name) == steps
    assert all(1 <= n <= block for _, n in turns)


def test_default_block_keeps_turns_short():
    assert compare.default_block(1) == 1
    assert compare.default_block(20) == 5
    assert compare.default_block(1000) == 10


def test_frozen_vs_full_arms(tiny):
    arms = compare.frozen_vs_full_arms(tiny(freeze__trainable="[layer4, fc]"))
    assert [a.name for a in arms] == ["full", "frozen"]
    assert arms[0].freeze == {"batchnorm": "frozen"}  # nothing selected: everything trains
    assert arms[1].freeze["trainable"] == ["layer4", "fc"]


def test_frozen_vs_full_needs_a_freeze_spec(tiny):
    with pytest.raises(ConfigError, match="freezes nothing"):
        compare.frozen_vs_full_arms(tiny())


def test_depth_arms_go_from_full_to_fc_only(tiny):
    arms = compare.depth_arms(tiny(freeze__trainable="[fc]", freeze__batchnorm="train"))
    assert [a.name for a in arms] == ["full", "stem", "layer1", "layer2", "layer3", "layer4"]
    assert [a.freeze.get("until") for a in arms] == [None, "stem", "layer1", "layer2", "layer3", "layer4"]
    assert all(a.freeze["batchnorm"] == "train" for a in arms)


def test_assemble_flags_arms_that_did_not_start_alike():
    specs = [compare.ArmSpec("full", "all"), compare.ArmSpec("frozen", "fc only")]
    info = {"params": {"total": 10, "trainable": 10, "frozen": 0, "trainable_pct": 100.0},
            "flops": {"forward": 1, "backward": 2, "total": 3}, "device": "cpu",
            "frozen_batchnorm_layers": 0, "execution": {}}
    final = {"timing": {"step_median_s": 1.0}, "memory": {"peak_bytes": 5}, "optimizer_state_bytes": 0,
             "loss": {}, "steps": 3, "freeze_integrity": {"ok": True}}
    infos = {"full": {**info, "initial_weights_sha256": "a"}, "frozen": {**info, "initial_weights_sha256": "b"}}
    finals = {"full": {**final, "batches_sha256": "x"}, "frozen": {**final, "batches_sha256": "x"}}
    fair = compare.assemble(specs, infos, finals, {"isolation": "inline"})["fairness"]
    assert fair["same_initial_weights"] is False
    assert fair["same_batches"] is True


# ---- a real (tiny) comparison, all arms in this process ----------------------------------------


@pytest.fixture(scope="module")
def inline_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    cfg = load_config(None, tiny_overrides(out / "run", **{"freeze.until": "layer4"}))
    turns = []
    result = compare.frozen_vs_full(cfg, steps=3, warmup=1, block=2, isolate=False,
                                    progress=lambda *a: turns.append(a[:3]))
    return result, turns, out / "run" / "compare"


def test_result_has_the_documented_keys(inline_result):
    result, _, _ = inline_result
    for key in TOP_KEYS:
        assert key in result
    assert result["versions"]["torch"]
    for name in ("full", "frozen"):
        for path in ARM_PATHS:
            dig(result["arms"][name], path)
    assert isinstance(result["speedup"]["measured"], float)
    assert result["speedup"]["flop_predicted"] > 2.5  # fc only: no backward through the backbone


def test_arms_ran_interleaved_in_the_planned_order(inline_result):
    _, turns, _ = inline_result
    assert turns == [
        ("full", "warmup", 1), ("frozen", "warmup", 1),
        ("full", "timed", 2), ("frozen", "timed", 2), ("full", "timed", 1), ("frozen", "timed", 1),
    ]


def test_arms_start_alike_and_see_the_same_batches(inline_result):
    result, _, _ = inline_result
    full, frozen = result["arms"]["full"], result["arms"]["frozen"]
    assert full["initial_weights_sha256"] == frozen["initial_weights_sha256"]
    assert full["batches_sha256"] == frozen["batches_sha256"]
    assert result["fairness"]["same_initial_weights"] and result["fairness"]["same_batches"]
    assert full["steps"] == frozen["steps"] == 4
    assert full["timing"]["steps_timed"] == frozen["timing"]["steps_timed"] == 3


def test_frozen_arm_stays_frozen(inline_result):
    result, _, _ = inline_result
    integ = result["freeze_integrity"]
    assert integ["ok"] and integ["changed"] == []
    assert integ["tensors_checked"] > 100  # every backbone weight and BatchNorm buffer
    assert integ["sha256_before"] == integ["sha256_after"]
    assert result["arms"]["frozen"]["params"]["trainable"] == 512 * 10 + 10
    assert result["arms"]["frozen"]["optimizer_state_bytes"] < result["arms"]["full"]["optimizer_state_bytes"]


def test_inline_arms_do_not_pretend_to_measure_memory(inline_result):
    result, _, _ = inline_result
    assert result["arms"]["full"]["memory"]["peak_bytes"] is None
    assert result["memory_saved"]["bytes"] is None


def test_outputs_are_written(inline_result):
    result, _, out = inline_result
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["speedup"] == result["speedup"]
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["arm"] for r in rows] == ["full", "frozen"]
    assert math.isclose(float(rows[1]["speedup_flop_predicted"]), result["speedup"]["flop_predicted"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "arms" / "frozen" / "config.yaml").is_file()


# ---- the CLI end to end ------------------------------------------------------------------------


def write_config(tmp_path, **freeze):
    cfg = {
        "device": "cpu",
        "model": {"name": "resnet18", "num_classes": 4, "weights": "none"},
        "freeze": freeze,
        "data": {"source": "synthetic", "image_size": 32, "batch_size": 4, "train_size": 12, "val_size": 4},
        "train": {"warmup_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_frozen_vs_full_in_worker_processes(tmp_path):
    path = write_config(tmp_path, until="layer4")
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--steps", "2",
                                   "--warmup", "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "faster measured" in res.output and "freeze integrity" in res.output
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["isolation"] == "process"
    full, frozen = result["arms"]["full"], result["arms"]["frozen"]
    for arm in (full, frozen):
        assert arm["memory"]["kind"] in ("cpu_peak_rss_growth", "cuda_max_allocated")
        assert arm["memory"]["peak_bytes"] > 0
    # Each arm's figure is its own: full keeps gradients and momentum for 11M parameters, fc-only none.
    assert full["memory"]["peak_bytes"] > frozen["memory"]["peak_bytes"]
    assert result["fairness"]["same_initial_weights"] and result["fairness"]["same_batches"]
    assert result["freeze_integrity"]["ok"]
    for ext in ("json", "csv", "png"):
        assert (tmp_path / "out" / f"compare.{ext}").is_file()


def test_cli_depths(tmp_path):
    path = write_config(tmp_path, trainable=["fc"])
    res = CliRunner().invoke(app, ["compare", "depths", "--config", str(path), "--steps", "1", "--warmup", "0",
                                   "--inline", "data.batch_size=2"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run" / "depths"
    result = json.loads((out / "depths.json").read_text())
    arms = result["arms"]
    assert list(arms) == ["full", "stem", "layer1", "layer2", "layer3", "layer4"]
    shares = [a["trainable_share"] for a in arms.values()]
    flops = [a["flops_per_step"] for a in arms.values()]
    assert shares == sorted(shares, reverse=True) and flops == sorted(flops, reverse=True)
    assert [a["speedup"]["flop_predicted"] for a in arms.values()][0] == 1.0
    assert result["freeze_integrity"]["ok"] and all(result["freeze_integrity"]["arms"].values())
    assert result["data"]["batch_size"] == 2
    assert len(list(csv.DictReader((out / "depths.csv").open()))) == 6
    assert (out / "depths.png").is_file()


def test_cli_refuses_a_config_that_freezes_nothing(tmp_path):
    path = write_config(tmp_path)
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--inline"])
    assert res.exit_code == 2
    assert "freezes nothing" in res.output
    assert "Traceback" not in res.output


def test_cli_refuses_to_overwrite_a_previous_comparison(tmp_path):
    path = write_config(tmp_path, until="layer4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--out", str(out)])
    assert res.exit_code == 2
    assert "not empty" in res.output
