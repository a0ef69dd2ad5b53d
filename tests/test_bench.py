import json
import runpy
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from freezetune.cli import app
from freezetune.compare import bench

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
SHRUNK = ["--sizes", "16", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--no-memory",
          "--depths", "layer4"]


def invoke(*args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_bench():
    # Two cells, four arms each (full, then fc only in every mode): enough to check the matrix,
    # the writing and the tables.
    return bench.run_bench(sizes=(16,), batch_sizes=(2, 3), steps=1, warmup=0, device="cpu", memory=False,
                           depths=("layer4",))


def test_tiny_matrix_writes_json_and_markdown(tiny_bench, tmp_path):
    json_path, md_path = bench.write_bench(tiny_bench, tmp_path, command="freezetune bench --tiny")
    assert json_path.name.startswith("cpu-") and "-torch" in json_path.name
    data = json.loads(json_path.read_text())
    assert data["command"] == "freezetune bench --tiny"
    assert [(c["image_size"], c["batch_size"]) for c in data["cells"]] == [(16, 2), (16, 3)]
    for cell in data["cells"]:
        assert list(cell["arms"]) == ["full", "layer4:plain", "layer4", "layer4:cached"]
        assert cell["fairness"]["same_initial_weights"] and cell["fairness"]["same_batches"]
        assert all(a["freeze_integrity_ok"] for a in cell["arms"].values())
        assert cell["arms"]["layer4:plain"]["frozen_bn_layers_changed"] == 20
        assert cell["arms"]["layer4:cached"]["loss_max_abs_diff_vs_optimized"] <= 1e-5
    md = md_path.read_text()
    assert "`freezetune bench --tiny`" in md
    rows = [line for line in md.splitlines() if line.startswith("| 16px")]
    assert len(rows) == 2 * 2 + 2 * 4  # summary: full + layer4 per cell; then every arm
    assert "| image | batch | arm |" in md and "| image | batch | frozen through |" in md


def test_markdown_has_one_row_per_cell_and_arm(tiny_bench):
    summary, arms = bench.markdown_table(tiny_bench).split("Every arm:")
    for table, rows in ((summary, 4), (arms, 8)):
        header = next(line for line in table.splitlines() if line.startswith("| image"))
        body = [line for line in table.splitlines() if line.startswith("| 16px")]
        assert len(body) == rows and all(line.count("|") == header.count("|") for line in body)
        assert any("layer4 (fc only)" in line for line in body)


def test_summary_puts_plain_optimized_and_cached_side_by_side(tiny_bench):
    table = bench.summary_table(tiny_bench)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 16px")]
    assert [r[2] for r in rows] == ["nothing (full fine-tuning)", "layer4 (fc only)"] * 2
    fc = rows[1]
    assert fc[5] != "-" and fc[6] != "-" and fc[8] != "-"  # plain, freezetune, + cache all measured
    assert fc[10] == "20 of 20"  # the plain loop moved every frozen BatchNorm's statistics


def test_memory_pass_gives_each_arm_its_own_peak():
    result = bench.run_bench(sizes=(16,), batch_sizes=(2,), steps=1, warmup=0, device="cpu",
                             depths=("layer4",), modes=("optimized",))
    arms = result["cells"][0]["arms"]
    assert all(a["memory_kind"] == "cpu_peak_rss_growth" and a["peak_memory_bytes"] > 0 for a in arms.values())
    # Full fine-tuning keeps gradients and momentum for 11M parameters; fc only for 5k.
    assert arms["full"]["peak_memory_bytes"] > arms["layer4"]["peak_memory_bytes"]
    assert "memory: each arm in its own process" in result["matrix"]["isolation"]


def fake_bench(measured=3.0, predicted=2.9, device="cpu (2 threads)", intact=True, same=True, vs_plain=1.3,
               cache_diff=0.0):
    arm = {"speedup_measured": 1.0, "speedup_flop_predicted": 1.0, "freeze_integrity_ok": True}
    fc = {"speedup_measured": measured, "speedup_flop_predicted": predicted, "freeze_integrity_ok": intact,
          "mode": "optimized", "speedup_vs_plain": vs_plain}
    cached = {**arm, "mode": "cached", "loss_max_abs_diff_vs_optimized": cache_diff}
    fair = {"same_initial_weights": same, "same_batches": True, "same_steps": True}
    return {"cells": [{"image_size": 64, "batch_size": 8, "device": device, "fairness": fair,
                       "arms": {"full": arm, "layer4": fc, "layer4:cached": cached}}]}


def test_gate_passes_a_good_result():
    assert bench.gate(fake_bench()) == []


@pytest.mark.parametrize("measured,predicted,expect", [
    (1.4, 1.5, "< 1.5x"),  # below the absolute floor
    (2.0, 2.93, "FLOP-predicted"),  # 2.0 < 0.8 x 2.93
])
def test_gate_fails_slow_fc_only(measured, predicted, expect):
    failures = bench.gate(fake_bench(measured, predicted))
    assert len(failures) == 1 and expect in failures[0]


def test_gate_fails_on_changed_frozen_tensors_or_unfair_arms():
    assert "frozen tensors changed" in bench.gate(fake_bench(intact=False))[0]
    assert "same_initial_weights" in bench.gate(fake_bench(same=False))[0]


def test_gate_fails_when_freezetune_is_slower_than_the_plain_loop():
    failures = bench.gate(fake_bench(vs_plain=0.95))
    assert len(failures) == 1 and "on average" in failures[0]
    failures = bench.gate(fake_bench(vs_plain=0.7))
    assert len(failures) == 2 and "layer4" in failures[0] and "0.70x < 0.8x" in failures[0]


def test_gate_tolerates_one_noisy_freeze_point_when_the_rest_are_faster():
    result = fake_bench(vs_plain=0.85)
    cell = result["cells"][0]
    cell["arms"]["layer3"] = {**cell["arms"]["layer4"], "speedup_vs_plain": 1.3}
    assert bench.gate(result) == []


def test_gate_fails_when_cached_training_differs():
    failures = bench.gate(fake_bench(cache_diff=0.05))
    assert len(failures) == 1 and "cached losses differ" in failures[0]


def test_gate_judges_speed_on_cpu_only():
    assert bench.gate(fake_bench(measured=1.1, device="cuda:0 (NVIDIA H100)")) == []


def test_bench_runs_a_shrunk_matrix(tmp_path):
    result = invoke(*SHRUNK, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "| image | batch |" in out
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list(tmp_path.glob("*.md"))) == 1
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["command"] == "freezetune bench " + " ".join([*SHRUNK, "--out", str(tmp_path)])
    assert "measured 16px batch 2: fc-only" in result.stderr


@pytest.fixture
def fake_run(monkeypatch):
    """Replaces the measuring with a canned result; returns what run_bench was called with."""
    seen = {"measured": 1.2}

    def run(sizes, batch_sizes, steps, warmup, *args):
        seen.update(sizes=sizes, batch_sizes=batch_sizes, steps=steps, args=args)
        return {**fake_bench(measured=seen["measured"]), "device": "cpu (2 threads)", "device_slug": "cpu-2threads",
                "freezetune_version": "0", "versions": {"torch": "2.0"}, "created": "now", "wall_s": 1.0,
                "load_average_1min": {"start": None, "end": None},
                "matrix": {"model": "resnet18", "steps": steps, "warmup": warmup}}

    monkeypatch.setattr(bench, "run_bench", run)
    monkeypatch.setattr(bench, "markdown_table", lambda b: "table\n")
    return seen


def test_bench_ci_mode_exits_nonzero_when_the_gate_fails(tmp_path, fake_run):
    result = invoke("--ci", "--out", tmp_path)
    assert result.exit_code == 1
    assert "BENCH GATE FAILED" in result.stderr
    seen = {k: fake_run[k] for k in ("sizes", "batch_sizes", "steps")}
    assert seen == {"sizes": bench.CI_SIZES, "batch_sizes": bench.CI_BATCH_SIZES, "steps": bench.CI_STEPS}


def test_bench_ci_mode_passes_a_good_result(tmp_path, fake_run):
    fake_run["measured"] = 3.0
    result = invoke("--ci", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("table\n")
    assert "bench gate passed: fc-only measured speedup >= 1.5x" in result.stdout
    assert "BENCH GATE FAILED" not in result.stderr
    assert fake_run["args"][2] is False  # --ci implies --no-memory


def test_bench_default_out_is_relative_to_the_current_directory(tmp_path, monkeypatch, fake_run):
    fake_run["measured"] = 3.0
    monkeypatch.chdir(tmp_path)
    assert invoke("--ci").exit_code == 0
    assert len(list((tmp_path / "runs" / "bench-ci").glob("*.json"))) == 1
    assert invoke().exit_code == 0
    assert len(list((tmp_path / "benchmarks").glob("*.md"))) == 1
    assert json.loads(next((tmp_path / "runs" / "bench-ci").glob("*.json")).read_text())["command"] == (
        "freezetune bench --ci")


@pytest.mark.parametrize("args,sizes,batch_sizes,depths,modes", [
    (["--sizes", "64,224", "--batch-sizes", "8"], (64, 224), (8,), bench.DEPTHS, bench.MODES),
    (["--sizes", "64", "--sizes", "224", "--depths", "layer3", "--depths", "layer4"], (64, 224),
     bench.DEFAULT_BATCH_SIZES, ("layer3", "layer4"), bench.MODES),
    (["--modes", "plain, optimized", "--depths", "stem,layer4"], bench.DEFAULT_SIZES, bench.DEFAULT_BATCH_SIZES,
     ("stem", "layer4"), ("plain", "optimized")),
])
def test_list_options_repeat_or_take_commas(tmp_path, fake_run, args, sizes, batch_sizes, depths, modes):
    assert invoke(*args, "--out", tmp_path).exit_code == 0
    assert (fake_run["sizes"], fake_run["batch_sizes"]) == (sizes, batch_sizes)
    assert fake_run["args"][4:] == (depths, modes)  # after device, block, memory, on_cell


@pytest.mark.parametrize("args,message", [
    (["--sizes", "64,0"], "--sizes must be positive"),
    (["--batch-sizes", "-1"], "--batch-sizes must be positive"),
    (["--sizes", "big"], "--sizes: invalid int value: 'big'"),
    (["--steps", "-1"], "--steps must be at least 1 and --warmup at least 0"),
    (["--warmup", "-1"], "--steps must be at least 1 and --warmup at least 0"),
    (["--depths", "layer9"], "unknown freeze point(s) layer9"),
    (["--sizes", "64", "224"], "unexpected argument(s) 224: give a list option several values by repeating it"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, args, message):
    result = invoke(*args, "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_help_names_the_ci_thresholds_and_the_list_syntax():
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert f"{bench.MIN_SPEEDUP}x" in text and f"sizes {bench.CI_SIZES}" in text
    assert "[default: 64 224]" in text and "[default: all: stem layer1 layer2 layer3 layer4]" in text
    assert "separate values with commas" in text and "relative to the current directory" in text
    assert "{" not in text


def test_the_script_is_a_shim_for_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *SHRUNK, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 0
    assert "| image | batch |" in capsys.readouterr().out
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["command"].startswith("freezetune bench --sizes 16 ")
