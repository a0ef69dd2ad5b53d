"""The sweep's results table at every console width: a pipe's 80 columns keep every arm's figures.

Records are built by hand as ``sweep.json`` holds them: :func:`legacy_record` with the keys every
record has, :func:`grid_record` with the learning-rate grid's keys as well, so nothing trains and
the renderer is held to both shapes.
"""

from __future__ import annotations

import io
import statistics

import pytest
from rich.console import Console

from freezetune.render.format import fmt_lr
from freezetune.render.sweep import arm_blocks, fitting_layout, recommendation_lines, sweep_table

TARGET = 0.75
# Per arm: label, trainable %, then per seed its validation accuracy after each epoch and its seconds per epoch.
CURVES = {
    "full": ("full fine-tuning", 100.0,
             [([0.5, 0.84, 0.81], 12.0), ([0.5, 0.86, 0.83], 12.5), ([0.5, 0.88, 0.85], 13.0)]),
    "layer3": ("frozen ..layer3", 42.0, [([0.6, 0.8, 0.82], 5.0), ([0.6, 0.8, 0.84], 5.4), ([0.6, 0.7, 0.74], 6.0)]),
    "linear": ("fc only", 0.1, [([0.4, 0.5, 0.6], 1.0), ([0.4, 0.5, 0.62], 1.1), ([0.4, 0.5, 0.64], 1.2)]),
}
GRID = [0.1, 0.3, 1.0, 3.0, 10.0]
BASE_LR = 0.01
SELECTION = "each arm at its best rate, chosen on the validation split by final accuracy"

# What the 3-seed record must show for each arm, whatever the width: final accuracy, rate, time to target, training.
FIGURES = {
    "full": ("0.830", "0.01", "25.00 s", "37.50 s"),
    "layer3": ("0.800", "0.03", "10.40 s", "16.40 s"),
    "linear": ("0.620", "0.1", "never", "3.30 s"),
}
SDS = {"full": ("± 0.020", "± 1.00 s", "± 1.50 s"), "layer3": ("± 0.053", "± 0.57 s", "± 1.51 s"),
       "linear": ("± 0.020", "± 0.30 s")}
MULTIPLIERS = {"full": "(1x)", "layer3": "(3x)", "linear": "(10x)"}
FULL_HEADER = ["arm", "trainable", "val acc", "best", "lr", "to target", "train", "val", "step", "GFLOPs",
               "peak mem"]


def _stat(values: list) -> dict:
    """Mean ± sd over seeds, as the record has it: no mean if any seed has no value."""
    if not values or any(v is None for v in values):
        return {"mean": None, "sd": None, "n": len(values)}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _seed(seed: int, accuracy: list[float], epoch_s: float) -> dict:
    n = len(accuracy)
    reached = next((i + 1 for i, a in enumerate(accuracy) if a >= TARGET), None)
    return {"seed": seed, "run_dir": f"runs/{seed}", "status": "completed", "pruned_at_epoch": None,
            "val_accuracy_by_epoch": accuracy, "val_loss_by_epoch": [1.0] * n, "epoch_wall_s": [epoch_s] * n,
            "val_s_by_epoch": [1.5] * n, "cached_by_epoch": [False] * n, "final_accuracy": accuracy[-1],
            "best_accuracy": max(accuracy), "wall_s": epoch_s * n, "val_s": 1.5 * n,
            "time_to_target_s": None if reached is None else epoch_s * reached, "epochs_to_target": reached,
            "step_median_s": 0.0123, "peak_memory_bytes": None, "error": None}


def _arm(name: str, seeds: int) -> dict:
    label, pct, curves = CURVES[name]
    runs = [_seed(i, *curve) for i, curve in enumerate(curves[:seeds])]

    def over(key: str) -> dict:
        return _stat([r[key] for r in runs])

    return {"name": name, "label": label, "overrides": {}, "status": "completed", "pruned_at_epoch": None,
            "val_accuracy": over("final_accuracy"), "best_val_accuracy": over("best_accuracy"),
            "wall_s": over("wall_s"), "val_s": over("val_s"), "time_to_target_s": over("time_to_target_s"),
            "epochs_to_target": over("epochs_to_target"), "step_s": over("step_median_s"),
            "val_accuracy_by_epoch": [statistics.fmean(e) for e in zip(*(r["val_accuracy_by_epoch"] for r in runs),
                                                                         strict=True)],
            "trainable_params": 1000, "trainable_pct": pct, "flops_per_step": 3_640_000_000, "feature_cache": False,
            "peak_memory_bytes": int(1.5 * 1024**3), "memory_kind": "cpu", "on_pareto": True, "seeds": runs}


def legacy_record(seeds: int = 3) -> dict:
    """A ``sweep.json`` of schema 1: no learning-rate keys (time to target has no mean unless every seed reached it)."""
    return {
        "schema_version": 1, "kind": "sweep", "freezetune_version": "0", "model": "resnet18",
        "data": {"source": "folder", "root": None, "image_size": 224, "batch_size": 32, "train_size": 100,
                 "val_size": 50},
        "epochs": 3, "seeds": list(range(seeds)), "target_accuracy": TARGET, "target_source": "given (--target)",
        "tolerance": 0.01, "prune": True, "pruning": {"rule": "r", "rungs": []},
        "arms": {name: _arm(name, seeds) for name in CURVES}, "pareto": list(CURVES),
        "recommendation": {"arm": "full", "reason": "full fine-tuning: the best.", "best": "full",
                           "eligible": ["full"], "indistinguishable": []},
        "mode": "in-process", "wall_s": 60.0, "device": "cpu", "versions": {"torch": "2", "torchvision": "0"},
        "out_dir": "out", "files": {"json": "out/sweep.json", "csv": "out/sweep.csv", "png": "out/sweep.png"},
    }


def _rates(statuses: dict[float, str]) -> list[dict]:
    acc = {0.1: 0.48, 0.3: 0.6, 1.0: 0.69, 3.0: 0.8, 10.0: 0.95}
    return [{"multiplier": m, "lr": BASE_LR * m, "status": statuses.get(m, "completed"),
             "val_accuracy": {"mean": None if statuses.get(m) == "nonfinite" else acc[m], "sd": None, "n": 1},
             "pruned_at_epoch": 1 if statuses.get(m) == "pruned" else None} for m in GRID]


def grid_record(seeds: int = 3) -> dict:
    """The record with the grid's keys too: arms at their best rate, time to target over the seeds that got there."""
    result = legacy_record(seeds)
    chosen = {"full": (1.0, None), "layer3": (3.0, None), "linear": (10.0, "high")}
    for name, (mult, edge) in chosen.items():
        arm = result["arms"][name]
        times = [s["time_to_target_s"] for s in arm["seeds"] if s["time_to_target_s"] is not None]
        arm.update(lr=BASE_LR * mult, lr_multiplier=mult, lr_edge=edge, target_reached=len(times),
                   time_to_target_s=_stat(times),
                   lr_grid=_rates({0.1: "pruned", 10.0: "nonfinite"} if name == "full" else {0.1: "pruned"}))
    result.update(lr_grid=GRID, base_lr=BASE_LR, selection=SELECTION)
    return result


def render(result: dict, width: int) -> str:
    """What ``freezetune sweep`` prints, on a console of ``width`` columns that is no terminal (a pipe)."""
    console = Console(width=width, force_terminal=False, file=io.StringIO(), log_path=False)
    for part in [sweep_table(result), *recommendation_lines(result)]:
        console.print(part)
    return console.file.getvalue()


def _line(out: str, name: str) -> str:
    """The first line that starts with the arm's name (a table row, or a block's head)."""
    return next(line for line in out.splitlines() if line.strip().startswith(name + " ") or line.strip() == name)


def _assert_every_arm_in_rows(out: str, figures: dict = FIGURES, with_lr: bool = True) -> None:
    """Each arm's row (its first line, with the means) holds its accuracy, rate, time to target and training time."""
    assert "…" not in out
    for name, (acc, lr, to_target, train) in figures.items():
        row = _line(out, name)
        assert acc in row.split() and to_target in row and train in row, (name, row)
        assert (lr in row.split()) == with_lr, (name, row)


RATES = {"full": "full    0.1x .48p | 0.3x .60 | 1x .69* | 3x .80 | 10x - nonfinite",
         "layer3": "layer3  0.1x .48p | 0.3x .60 | 1x .69 | 3x .80* | 10x .95",
         "linear": "linear  0.1x .48p | 0.3x .60 | 1x .69 | 3x .80 | 10x .95*"}


# --------------------------------------------------------------------------------------------
# 80 columns, no terminal


def test_80_columns_keep_every_arms_accuracy_rate_time_to_target_and_training_time():
    out = render(grid_record(), 80)
    assert max(len(line) for line in out.splitlines()) <= 80
    _assert_every_arm_in_rows(out)
    for name, sds in SDS.items():
        assert all(sd in out for sd in sds), name
        assert MULTIPLIERS[name] in out
    assert "(2/3)" in out  # layer3: two of its three seeds reached the target, in 10.40 s on average
    assert "never" in _line(out, "linear")
    assert all(words in out for words in ("lr at grid", "edge (high)", "--lr-grid"))  # the notes wrap
    assert all(rates in out for rates in RATES.values())
    assert "lr grid: 0.1x, 0.3x, 1x, 3x, 10x of the config's lr 0.01" in out and SELECTION in out
    assert "recommendation: full at lr 0.01 (1x)" in out


def test_80_columns_with_one_seed_is_one_line_per_arm():
    out = render(grid_record(seeds=1), 80)
    rows = {name: _line(out, name) for name in FIGURES}
    assert "0.810" in rows["full"] and "24.00 s" in rows["full"] and "36.00 s" in rows["full"]  # seed 0 alone
    assert "0.820" in rows["layer3"] and "10.00 s" in rows["layer3"] and "15.00 s" in rows["layer3"]
    assert "0.600" in rows["linear"] and "never" in rows["linear"] and "3.00 s" in rows["linear"]
    assert "0.01 (1x)" in rows["full"] and "0.03 (3x)" in rows["layer3"] and "0.1 (10x)" in rows["linear"]
    assert "±" not in out.split("recommendation:")[0]


def test_a_piped_command_line_console_at_columns_80_prints_every_arms_figures(monkeypatch):
    from typer.testing import CliRunner

    from freezetune.cli import sweep_cmd

    with CliRunner().isolation(env={"COLUMNS": "80", "LINES": "25"}) as (stdout, _, _):
        monkeypatch.setattr(sweep_cmd, "console", Console(log_path=False))  # as cli.common builds it, on the pipe
        sweep_cmd._show(grid_record())
        out = stdout.getvalue().decode()
    assert max(len(line) for line in out.splitlines()) <= 80
    _assert_every_arm_in_rows(out)
    assert "recommendation: full at lr 0.01 (1x)" in out and "\x1b[" not in out


# --------------------------------------------------------------------------------------------
# Wide consoles: the full table


def test_a_wide_console_prints_the_full_table_with_every_column():
    out = render(grid_record(), 250)
    header = next(line for line in out.splitlines() if line.split()[:1] == ["arm"])
    assert header.split() == " ".join(FULL_HEADER).split()
    full = _line(out, "full (full fine-tuning)")
    for text in ("100.0%", "0.830 ± 0.020", "0.860 ± 0.020", "0.01 (1x)", "25.00 s ± 1.00 s", "37.50 s ± 1.50 s",
                 "4.50 s ± 0.00 s", "12.3", "3.64", "1.5 GiB", "recommended, pareto"):
        assert text in full, text
    layer3 = _line(out, "layer3 (frozen ..layer3)")
    assert "42.0%" in layer3 and "10.40 s ± 0.57 s (2/3)" in layer3 and "0.03 (3x)" in layer3
    linear = _line(out, "linear (fc only)")
    assert "never" in linear and "0.1 (10x)" in linear and "lr at grid edge (high): widen --lr-grid" in linear
    assert all(rates in out for rates in RATES.values()) and "* the arm's rate" in out
    assert "lr grid: 0.1x, 0.3x, 1x, 3x, 10x of the config's lr 0.01" in out and SELECTION in out


def test_a_console_too_narrow_for_the_inline_table_stacks_each_sd_under_its_mean():
    console = Console(width=160, force_terminal=False, file=io.StringIO())
    table = fitting_layout(grid_record(), console, console.options)
    assert [c.header for c in table.columns] == [*FULL_HEADER, ""]
    console.print(table)
    out = console.file.getvalue()
    full = _line(out, "full (full fine-tuning)")
    assert "0.830" in full and "0.860" in full and "± 0.020" not in full
    assert full.split() == ["full", "(full", "fine-tuning)", "100.0%", "0.830", "0.860", "0.01", "25.00", "s",
                            "37.50", "s", "4.50", "s", "12.3", "3.64", "1.5", "GiB", "recommended,", "pareto"]
    assert "± 0.020" in out and "± 1.00 s" in out and "(1x)" in out


@pytest.mark.parametrize("width", range(40, 261, 11))
def test_every_width_keeps_every_arms_figures_whole(width):
    out = render(grid_record(), width)
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= width
    for figures in FIGURES.values():
        assert all(text in out for text in figures)


# --------------------------------------------------------------------------------------------
# Narrower than any table: one block per arm


def test_a_very_narrow_console_prints_one_block_per_arm():
    out = render(grid_record(), 50)
    assert "val acc" not in out.splitlines()[2]  # no table header
    blocks = out.split("\n\n")
    for name, (acc, lr, to_target, train) in FIGURES.items():
        block = next(b for b in blocks if b.strip().startswith(name))
        assert f"val acc    {acc}" in block and f"lr         {lr} {MULTIPLIERS[name]}" in block
        assert f"to target  {to_target}" in block and f"train      {train}" in block
        assert "GFLOPs 3.64" in block and "trainable" in block
        assert RATES[name].split(maxsplit=1)[1].split(" | ")[0] in block  # the rates, split between two of them
    assert "frozen ..layer3" in out and "(2/3)" in out and "rates tried" not in out


def test_blocks_of_a_record_without_a_grid_skip_the_rates():
    console = Console(width=200, force_terminal=False, file=io.StringIO())
    console.print(arm_blocks(legacy_record()))
    out = console.file.getvalue()
    assert "rates" not in out and "\n  lr " not in out
    assert "val acc    0.830 ± 0.020   best 0.860 ± 0.020" in out and "to target  - (2/3)" in out
    assert "cost       step 12.3 ms   GFLOPs 3.64   peak mem 1.5 GiB   trainable 100.0%" in out


# --------------------------------------------------------------------------------------------
# Records without the grid's keys, or with a grid of one rate


@pytest.mark.parametrize("width", [80, 250])
def test_records_without_the_grids_keys_still_render(width):
    out = render(legacy_record(), width)
    # The old stat is over every seed: no mean for layer3, two of whose three seeds reached the target.
    _assert_every_arm_in_rows(out, {**FIGURES, "layer3": ("0.800", "0.03", "- (2/3)", "16.40 s")}, with_lr=False)
    assert " lr " not in out.split("recommendation:")[0] and "rates" not in out and "lr grid" not in out
    assert "recommendation: full." in out
    if width == 250:
        header = next(line for line in out.splitlines() if line.split()[:1] == ["arm"])
        assert header.split() == " ".join(h for h in FULL_HEADER if h != "lr").split()


def test_a_sweep_of_one_rate_shows_the_rate_but_no_grid():
    result = grid_record()
    for arm in result["arms"].values():
        arm.update(lr=BASE_LR, lr_multiplier=1.0, lr_edge=None, lr_grid=arm["lr_grid"][2:3])
    result.update(lr_grid=[1.0])
    result["recommendation"].update(lr=BASE_LR, lr_multiplier=1.0)
    out = render(result, 250)
    assert "0.01 (1x)" in _line(out, "linear (fc only)") and "recommendation: full at lr 0.01 (1x)" in out
    assert "rates tried" not in out and "lr grid" not in out and SELECTION not in out


def test_a_sweep_without_a_target_shows_no_time_to_target():
    result = legacy_record(seeds=1)
    result["target_accuracy"] = None
    out = render(result, 250)
    assert "never" not in out and "to target =" not in out
    assert _line(out, "linear (fc only)").split()[3:7] == ["0.1%", "0.600", "0.600", "-"]


def test_fmt_lr_is_short():
    assert [fmt_lr(x) for x in (0.1, 0.003, 1e-4, 3e-5, 0.012345)] == ["0.1", "0.003", "0.0001", "3e-05", "0.0123"]
