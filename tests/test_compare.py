import csv
import json
import math

import pytest
from typer.testing import CliRunner

from freezetune import compare
from freezetune.cli import app
from freezetune.errors import ConfigError

pytestmark = pytest.mark.heavy(55)

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
    assert [a.name for a in arms] == ["full", "frozen:plain", "frozen", "frozen:cached"]
    assert [a.mode for a in arms] == ["full", "plain", "optimized", "cached"]
    assert arms[0].freeze == {"batchnorm": "frozen"}  # nothing selected: everything trains
    assert all(a.freeze["trainable"] == ["layer4", "fc"] for a in arms[1:])


def test_frozen_vs_full_needs_a_freeze_spec(tiny):
    with pytest.raises(ConfigError, match="freezes nothing"):
        compare.frozen_vs_full_arms(tiny())


def test_depth_arms_go_from_full_to_fc_only(tiny):
    arms = compare.depth_arms(tiny(freeze__trainable="[fc]", freeze__batchnorm="train"), modes=("optimized",))
    assert [a.name for a in arms] == ["full", "stem", "layer1", "layer2", "layer3", "layer4"]
    assert [a.freeze.get("until") for a in arms] == [None, "stem", "layer1", "layer2", "layer3", "layer4"]
    assert [a.depth for a in arms] == [None, "stem", "layer1", "layer2", "layer3", "layer4"]
    assert all(a.freeze["batchnorm"] == "train" for a in arms)


def test_depth_arms_run_every_mode_per_freeze_point(tiny):
    arms = compare.depth_arms(tiny(), stages=("layer3", "layer4"))
    assert [a.name for a in arms] == ["full", "layer3:plain", "layer3", "layer3:cached",
                                      "layer4:plain", "layer4", "layer4:cached"]


def test_depth_arms_take_block_points_in_depth_order(tiny):
    cfg = tiny()
    arms = compare.depth_arms(cfg, stages=("layer3", "layer2.0", "stem"), modes=("optimized",))
    assert [(a.name, a.freeze.get("until"), a.depth) for a in arms[1:]] == [
        ("stem", "stem", "stem"), ("layer2.0", "layer2.0", "layer2.0"), ("layer3", "layer3", "layer3")]
    every = compare.depth_arms(cfg, stages=("blocks",), modes=("optimized",))
    assert [a.name for a in every][1:] == ["stem", *(f"layer{i}.{b}" for i in range(1, 5) for b in range(2))]
    assert every[-1].label == "fc only"
    with pytest.raises(ConfigError, match="layer1 and layer1.1 freeze the same parameters"):
        compare.depth_arms(cfg, stages=("layer1", "layer1.1"))
    with pytest.raises(ConfigError, match="unknown freeze point.*layer2.7.*layer1.0"):
        compare.depth_arms(cfg, stages=("layer2.7",))


@pytest.mark.parametrize("modes,message", [(("fast",), "unknown mode"), (("plain", "cached"), "include optimized")])
def test_bad_modes_are_refused(tiny, modes, message):
    with pytest.raises(ConfigError, match=message):
        compare.depth_arms(tiny(), modes=modes)


def test_modes_are_put_in_their_fixed_order():
    assert compare.check_modes(["cached", "optimized"]) == ("optimized", "cached")


def test_plain_arm_config_is_the_plain_loop(tiny, tmp_path):
    cfg = tiny()
    arms = {a.name: a for a in compare.frozen_vs_full_arms(tiny(freeze__until="layer3"))}
    plain = compare.arm_config(cfg, arms["frozen:plain"], tmp_path / "w.safetensors", tmp_path / "a")
    assert plain.freeze.batchnorm == "train" and plain.train.fold_batchnorm is False
    assert plain.train.feature_cache == "off"
    cached = compare.arm_config(cfg, arms["frozen:cached"], tmp_path / "w.safetensors", tmp_path / "b")
    assert cached.train.feature_cache == "on" and cached.freeze.batchnorm == "frozen"
    optimized = compare.arm_config(cfg, arms["frozen"], tmp_path / "w.safetensors", tmp_path / "c")
    assert optimized.train.feature_cache == "off"


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
def inline_result(tmp_path_factory, tiny_at):
    out = tmp_path_factory.mktemp("cmp")
    cfg = tiny_at(out / "run", freeze__until="layer3")
    turns = []
    result = compare.frozen_vs_full(cfg, steps=3, warmup=1, block=2, memory=False,
                                    progress=lambda *a: turns.append(a[:3]))
    return result, turns, out / "run" / "compare"


ARMS = ["full", "frozen:plain", "frozen", "frozen:cached"]


def test_result_has_the_documented_keys(inline_result):
    result, _, _ = inline_result
    for key in TOP_KEYS:
        assert key in result
    assert result["versions"]["torch"]
    assert list(result["arms"]) == ARMS and result["skipped"] == []
    for name in ARMS:
        for path in ARM_PATHS:
            dig(result["arms"][name], path)
    assert isinstance(result["speedup"]["measured"], float)
    assert result["speedup"]["flop_predicted"] > 1.5  # layer4 + fc: no backward through the rest


def test_arms_ran_interleaved_in_the_planned_order(inline_result):
    _, turns, _ = inline_result
    warm = [(a, "warmup", 1) for a in ARMS]
    assert turns == [("frozen:cached", "fill", 0), *warm, *[(a, "timed", 2) for a in ARMS],
                     *[(a, "timed", 1) for a in ARMS]]


def test_arms_start_alike_and_see_the_same_batches(inline_result):
    result, _, _ = inline_result
    arms = result["arms"]
    assert len({a["initial_weights_sha256"] for a in arms.values()}) == 1
    # The cached arm trains on features, and hashes the images they came from.
    assert len({a["batches_sha256"] for a in arms.values()}) == 1
    assert result["fairness"]["same_initial_weights"] and result["fairness"]["same_batches"]
    assert all(a["steps"] == 4 and a["timing"]["steps_timed"] == 3 for a in arms.values())


def test_frozen_arm_stays_frozen(inline_result):
    result, _, _ = inline_result
    integ = result["freeze_integrity"]
    assert integ["ok"] and integ["changed"] == []
    assert integ["tensors_checked"] == 90  # every weight and BatchNorm buffer of stem .. layer3
    assert integ["sha256_before"] == integ["sha256_after"]
    frozen, full = result["arms"]["frozen"], result["arms"]["full"]
    assert frozen["params"]["trainable"] < full["params"]["trainable"] / 1.2
    assert frozen["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert all(a["freeze_integrity"]["ok"] for a in result["arms"].values())


def test_cached_arm_trains_exactly_like_the_uncached_one(inline_result):
    result, _, _ = inline_result
    cached, frozen = result["arms"]["frozen:cached"], result["arms"]["frozen"]
    assert cached["losses"] == pytest.approx(frozen["losses"], abs=1e-5)
    assert cached["loss_max_abs_diff_vs_optimized"] <= 1e-5
    assert cached["cache"]["cache_bytes"] > 0 and cached["cache"]["cache_fill_s"] > 0
    # Without computing the prefix, a cached step counts fewer FLOPs; its backward is the same.
    assert cached["flops"]["forward"] < frozen["flops"]["forward"]
    assert cached["flops"]["backward"] == frozen["flops"]["backward"]
    assert cached["execution"]["feature_cache"]["enabled"] and not frozen["execution"]["feature_cache"]["enabled"]


def test_plain_arm_lets_frozen_batchnorm_statistics_drift(inline_result):
    result, _, _ = inline_result
    plain, frozen = result["arms"]["frozen:plain"], result["arms"]["frozen"]
    # stem (1) + layer1 (4) + layer2 (5) + layer3 (5) BatchNorm layers; train mode updates all of them.
    assert plain["frozen_batchnorm_drift"]["layers_checked"] == 15
    assert plain["frozen_batchnorm_drift"]["layers_changed"] == 15
    assert frozen["frozen_batchnorm_drift"]["layers_changed"] == 0
    assert not plain["execution"]["prefix_without_autograd"] and frozen["execution"]["folded_batchnorm"]
    # The frozen weights themselves stay put either way.
    assert plain["freeze_integrity"]["ok"]
    assert "vs_plain" in frozen["speedup"] and "vs_plain" in result["arms"]["frozen:cached"]["speedup"]


def test_an_impossible_cached_arm_is_left_out_with_the_reason(tiny):
    cfg = tiny(freeze__until="layer4", data__augment=True)
    result = compare.frozen_vs_full(cfg, steps=1, warmup=0, memory=False, modes=("optimized", "cached"))
    assert list(result["arms"]) == ["full", "frozen"]
    assert result["skipped"][0]["arm"] == "frozen:cached" and "augment" in result["skipped"][0]["reason"]


def test_without_the_memory_pass_memory_is_not_pretended(inline_result):
    result, _, _ = inline_result
    assert result["arms"]["full"]["memory"]["peak_bytes"] is None
    assert result["memory_saved"]["bytes"] is None


def test_outputs_are_written(inline_result):
    result, _, out = inline_result
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["speedup"] == result["speedup"]
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["arm"] for r in rows] == ARMS
    assert [r["mode"] for r in rows] == ["full", "plain", "optimized", "cached"]
    assert math.isclose(float(rows[2]["speedup_flop_predicted"]), result["speedup"]["flop_predicted"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "arms" / "frozen" / "config.yaml").is_file()
    assert (out / "arms" / "frozen-cached" / "config.yaml").is_file()


# ---- the CLI end to end ------------------------------------------------------------------------


def test_cli_frozen_vs_full_times_inline_and_measures_memory_per_process(tmp_path, tiny_yaml):
    path = tiny_yaml(freeze__until="layer4")
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--steps", "2",
                                   "--warmup", "1", "--out", str(tmp_path / "out"), "--modes", "optimized"])
    assert res.exit_code == 0, res.output
    assert "faster measured" in res.output and "freeze integrity" in res.output
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["isolation"].startswith("timing: all arms in one process")
    assert "memory: each arm in its own process" in result["isolation"]
    assert result["memory_pass"]["fairness"]["same_initial_weights"]
    full, frozen = result["arms"]["full"], result["arms"]["frozen"]
    assert frozen["memory_saved_bytes"] == full["memory"]["peak_bytes"] - frozen["memory"]["peak_bytes"]
    for arm in (full, frozen):
        assert arm["memory"]["kind"] in ("cpu_peak_rss_growth", "cuda_max_allocated")
        assert arm["memory"]["peak_bytes"] > 0
    # Each arm's figure is its own: full keeps gradients and momentum for 11M parameters, fc-only none.
    assert full["memory"]["peak_bytes"] > frozen["memory"]["peak_bytes"]
    # And its parts: the same weights, the trainable ones' gradients and momentum, and what one
    # step saved for backward (fc-only: the head's input and the loss's few tensors).
    fm, rm = full["memory"], frozen["memory"]
    assert fm["param_bytes"] == rm["param_bytes"] == fm["grad_bytes"] == fm["optimizer_state_bytes"]
    assert rm["grad_bytes"] == rm["optimizer_state_bytes"] == (512 * 10 + 10) * 4
    assert fm["saved_activation_bytes"] > 50 * rm["saved_activation_bytes"] > 0
    assert result["fairness"]["same_initial_weights"] and result["fairness"]["same_batches"]
    assert result["freeze_integrity"]["ok"]
    for ext in ("json", "csv", "png"):
        assert (tmp_path / "out" / f"compare.{ext}").is_file()


def test_cli_depths(tmp_path, tiny_yaml):
    path = tiny_yaml(freeze__trainable="[fc]")
    res = CliRunner().invoke(app, ["compare", "depths", "--config", str(path), "--steps", "1", "--warmup", "0",
                                   "--no-memory", "data.batch_size=2"])
    assert res.exit_code == 0, res.output
    assert "freezetune" in res.output and "+cache" in res.output  # the per-depth table
    out = tmp_path / "run" / "depths"
    result = json.loads((out / "depths.json").read_text())
    arms = result["arms"]
    stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert list(arms) == ["full", *(f"{s}{m}" for s in stages for m in (":plain", "", ":cached"))]
    optimized = [arms["full"], *(arms[s] for s in stages)]
    shares = [a["trainable_share"] for a in optimized]
    flops = [a["flops_per_step"] for a in optimized]
    assert shares == sorted(shares, reverse=True) and flops == sorted(flops, reverse=True)
    assert arms["full"]["speedup"]["flop_predicted"] == 1.0
    for s in stages:  # the cached arm skips the prefix: fewer FLOPs, the same losses
        assert arms[f"{s}:cached"]["flops_per_step"] < arms[s]["flops_per_step"]
        assert arms[f"{s}:cached"]["loss_max_abs_diff_vs_optimized"] <= 1e-5
    assert result["freeze_integrity"]["ok"] and all(result["freeze_integrity"]["arms"].values())
    assert result["data"]["batch_size"] == 2
    assert len(list(csv.DictReader((out / "depths.csv").open()))) == 16
    assert (out / "depths.png").is_file()


def test_cli_depths_through_block_points(tmp_path, tiny_yaml):
    path = tiny_yaml()
    res = CliRunner().invoke(app, ["compare", "depths", "--config", str(path), "--steps", "1", "--warmup", "0",
                                   "--no-memory", "--modes", "optimized,cached", "--points", "layer2,layer2.0,layer1",
                                   "data.batch_size=2"])
    assert res.exit_code == 0, res.output
    arms = json.loads((tmp_path / "run" / "depths" / "depths.json").read_text())["arms"]
    assert list(arms) == ["full", *(f"{p}{m}" for p in ("layer1", "layer2.0", "layer2") for m in ("", ":cached"))]
    flops = [arms[p]["flops_per_step"] for p in ("full", "layer1", "layer2.0", "layer2")]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4  # each block point costs less
    assert arms["layer2.0:cached"]["flops_per_step"] < arms["layer2.0"]["flops_per_step"]
    assert arms["layer2.0:cached"]["loss_max_abs_diff_vs_optimized"] <= 1e-5
    assert arms["layer2.0"]["freeze_integrity"]["ok"]


def test_cli_refuses_bad_modes(tmp_path, tiny_yaml):
    path = tiny_yaml(freeze__until="layer4")
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--modes", "plain,quick"])
    assert res.exit_code == 2
    assert "unknown mode(s) quick" in res.output and "Traceback" not in res.output


def test_cli_refuses_a_config_that_freezes_nothing(tmp_path, tiny_yaml):
    path = tiny_yaml()
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--no-memory"])
    assert res.exit_code == 2
    assert "freezes nothing" in res.output
    assert "Traceback" not in res.output


def test_cli_refuses_an_adapt_method_naming_the_sweep_arm(tmp_path, tiny_yaml):
    path = tiny_yaml(freeze__until="layer4")
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "adapt.method=bn",
                                   "--no-memory", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "--only full,bn" in res.output and "Traceback" not in res.output


def test_cli_refuses_to_overwrite_a_previous_comparison(tmp_path, tiny_yaml):
    path = tiny_yaml(freeze__until="layer4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    res = CliRunner().invoke(app, ["compare", "frozen-vs-full", "--config", str(path), "--out", str(out)])
    assert res.exit_code == 2
    assert "not empty" in res.output


def test_depth_arms_come_from_the_model_catalog_for_every_family(tiny):
    cfg = tiny(model__name="mobilenet_v3_small")
    arms = compare.depth_arms(cfg, modes=("optimized",))
    assert [a.name for a in arms] == ["full", "stem", "stage1", "stage2", "stage3", "stage4", "last_conv"]
    assert arms[-1].label == "head only"
    with pytest.raises(ConfigError, match="choose from stem, stage1"):
        compare.depth_arms(cfg, stages=("layer3",))


def test_compare_depths_runs_a_non_resnet(tmp_path, tiny):
    cfg = tiny(model__name="mobilenet_v3_small")
    arms = compare.depth_arms(cfg, stages=("stage4",), modes=("optimized", "cached"))
    result = compare.measure(cfg, arms, tmp_path / "out", steps=1, warmup=0, memory=False)
    assert list(result["arms"]) == ["full", "stage4"]  # no frozen-prefix path, so no cached arm
    assert "ResNets only" in result["skipped"][0]["reason"]
    assert result["arms"]["stage4"]["freeze_integrity"]["ok"]


def test_a_worker_process_error_keeps_its_type_in_the_parent(tiny, tmp_path):
    from freezetune.compare.forkserver import start_workers
    from freezetune.compare.worker import ProcessArm, worker_env
    from freezetune.errors import WeightsError

    cfg = tiny(model__weights=str(tmp_path / "missing.safetensors"))
    server = start_workers(worker_env())
    try:
        arm = ProcessArm(cfg, compare.ArmSpec("frozen", "fc only", {"until": "layer4"}), server)
        try:
            arm.submit("setup", 3)
            with pytest.raises(WeightsError, match="missing.safetensors"):
                arm.wait()
        finally:
            arm.close()
    finally:
        server.close()


def test_an_arm_refuses_a_command_outside_its_protocol(tiny):
    from freezetune.compare.worker import InlineArm

    with pytest.raises(RuntimeError, match="unknown arm command 'train'"):
        InlineArm(tiny(), compare.ArmSpec("full", "all")).submit("train")


def test_a_non_finite_loss_stops_the_comparison_with_one_clear_error(tiny):
    from freezetune.errors import NonFiniteLossError

    # lr 1e38: step 1 is finite but its update overflows the logits, so step 2's loss is NaN.
    cfg = tiny(optim__lr="1.0e+38", freeze__until="layer4")
    with pytest.raises(NonFiniteLossError, match=r"arm full: training stopped early \(loss became nan at step 2\)"):
        compare.frozen_vs_full(cfg, steps=3, warmup=0, memory=False, modes=("optimized",))
