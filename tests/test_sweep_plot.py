"""The sweep figure from synthetic sweep records: no training, just the dicts a sweep writes."""

import math
import statistics
import struct

import pytest
from matplotlib.text import Text

from freezetune.render.sweep_plot import (
    arm_colors,
    arm_curve,
    arm_point,
    footer,
    needs_log,
    stack_labels,
    sweep_figure,
    sweep_plot,
    sweep_title,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stat(values):
    vals = [v for v in values if v is not None]
    if len(vals) != len(values) or not vals:
        return {"mean": None, "sd": None, "n": len(vals)}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals)}


def make_arm(curves, epoch_s, status="completed", label="frozen ..layer3", final=None):
    """One arm as the sweep record holds it: per-seed accuracy curves and per-epoch training seconds."""
    seeds = [{"seed": i, "epoch_wall_s": list(w), "val_accuracy_by_epoch": list(c)}
             for i, (c, w) in enumerate(zip(curves, epoch_s, strict=True))]
    length = min(len(c) for c in curves)
    return {
        "label": label, "status": status,
        "val_accuracy": stat(final if final is not None else [c[-1] for c in curves]),
        "wall_s": stat([sum(w) for w in epoch_s]),
        "val_accuracy_by_epoch": [statistics.fmean(c[i] for c in curves) for i in range(length)],
        "seeds": seeds,
    }


def make_result(arms, seeds=(0, 1), pareto=(), pick="stem", target=0.72, reason="the best, and cheap."):
    return {
        "model": "resnet18", "epochs": 3, "seeds": list(seeds), "target_accuracy": target, "tolerance": 0.01,
        "pareto": list(pareto), "recommendation": {"arm": pick, "reason": reason}, "arms": arms,
    }


def two_seed_result(**kwargs):
    arms = {
        "full": make_arm([[0.5, 0.65, 0.70], [0.52, 0.66, 0.71]], [[10, 10, 10], [11, 9, 10]],
                         label="full fine-tuning"),
        "stem": make_arm([[0.55, 0.70, 0.73], [0.56, 0.71, 0.74]], [[8, 8, 8], [8.5, 8, 7.5]]),
        "layer4": make_arm([[0.3, 0.4], [0.31, 0.4]], [[1, 1], [1.1, 0.9]], status="pruned", label="fc only"),
    }
    return make_result(arms, pareto=["layer4", "stem"], **kwargs)


def one_seed_result(**kwargs):
    arms = {
        "full": make_arm([[0.5, 0.65, 0.70]], [[10, 10, 10]], label="full fine-tuning"),
        "stem": make_arm([[0.55, 0.70, 0.73]], [[8, 8, 8]]),
    }
    return make_result(arms, seeds=(0,), pareto=["stem"], **kwargs)


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # IHDR: 13x5 inches at 120 dpi
    assert (width, height) == (1560, 600)
    assert len(data) > 20_000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp sibling left behind


@pytest.mark.parametrize("build, kwargs", [
    (two_seed_result, {}),
    (one_seed_result, {}),
    (two_seed_result, {"pick": None, "reason": "no arm reached the target"}),
    (two_seed_result, {"target": None}),
    (one_seed_result, {"pick": None, "reason": None, "target": None}),
], ids=["two-seeds", "one-seed", "no-pick", "no-target", "bare"])
def test_writes_a_png(tmp_path, build, kwargs):
    path = sweep_plot(build(**kwargs), tmp_path / "sweep.png")
    assert path == tmp_path / "sweep.png"
    check_png(path)


def test_arm_without_accuracy_is_skipped(tmp_path):
    result = two_seed_result()
    result["arms"]["layer2"] = make_arm([[0.4, 0.5], [0.45]], [[5, 5], [5]], status="interrupted",
                                        final=[0.5, None])
    assert result["arms"]["layer2"]["val_accuracy"]["mean"] is None
    assert arm_point(result["arms"]["layer2"]) is None
    check_png(sweep_plot(result, str(tmp_path / "sweep.png")))  # a str path works too


def test_empty_arms_still_draw(tmp_path):
    result = make_result({}, pick=None, reason=None, target=None)
    check_png(sweep_plot(result, tmp_path / "sweep.png"))


def test_second_call_overwrites(tmp_path):
    path = tmp_path / "sweep.png"
    sweep_plot(one_seed_result(), path)
    first = path.read_bytes()
    sweep_plot(two_seed_result(), path)
    assert path.read_bytes() != first
    check_png(path)


def test_panels_share_arm_colours():
    result = two_seed_result()
    colors = arm_colors(result["arms"])
    fig = sweep_figure(result)
    ax_cost, ax_curve = fig.axes
    lines = {line.get_label().split(" ")[0]: line.get_color() for line in ax_curve.get_lines()
             if not line.get_label().startswith(("_", "target"))}
    assert lines == {name: colors[name] for name in result["arms"]}
    assert len(set(colors.values())) == len(colors)
    labels = {t.get_text() for t in ax_cost.texts}
    assert labels == {"full", "stem", "layer4 (pruned)"}
    legend = {t.get_text() for t in ax_cost.get_legend().get_texts()}
    assert {"Pareto front", "recommended", "pruned (stopped early)", "target (72.0%)"} <= legend


def test_with_the_memory_pass_a_third_panel_plots_accuracy_against_peak_memory(tmp_path):
    result = two_seed_result()
    for name, mib in (("full", 900), ("stem", 700), ("layer4", 120)):
        result["arms"][name].update(peak_memory_bytes=mib * 2**20, memory_kind="cpu_peak_rss_growth")
    result["memory_pareto"] = ["layer4", "stem"]
    fig = sweep_figure(result)
    ax_cost, ax_curve, ax_memory = fig.axes
    assert {t.get_text() for t in ax_memory.texts} == {"full", "stem", "layer4"}
    assert "Pareto front (memory)" in {t.get_text() for t in ax_memory.get_legend().get_texts()}
    assert "peak memory, MiB" in ax_memory.get_xlabel() and ax_memory.get_xscale() == "linear"
    front = next(line for line in ax_memory.get_lines() if line.get_label() == "Pareto front (memory)")
    assert list(front.get_xdata())[:2] == [120, 700]
    data = sweep_plot(result, tmp_path / "sweep.png").read_bytes()
    assert struct.unpack(">II", data[16:24]) == (19 * 120, 600)  # three panels: 19x5 inches at 120 dpi


def test_curve_uses_shortest_seed_and_cumulative_mean_time():
    arm = make_arm([[0.5, 0.6, 0.7], [0.5, 0.6]], [[10, 10, 10], [12, 8]])
    xs, ys = arm_curve(arm)
    assert xs == [11.0, 20.0]
    assert ys == pytest.approx([0.5, 0.6])
    arm["val_accuracy_by_epoch"] = [0.5]  # a shorter mean curve cuts the times too
    assert arm_curve(arm) == ([11.0], [0.5])
    arm["val_accuracy_by_epoch"] = [None, 0.6]
    xs, ys = arm_curve(arm)
    assert math.isnan(ys[0]) and ys[1] == 0.6
    assert arm_curve({"seeds": [], "val_accuracy_by_epoch": [0.5]}) == ([], [])


def test_title_and_footer():
    result = two_seed_result(reason="frozen ..stem: 0.733 ± 0.010, the best, " * 10)
    assert sweep_title(result) == "resnet18: which layers to freeze? (2 seed(s), 3 epochs)"
    text = footer(result)
    assert text.startswith("Recommended: stem. frozen ..stem")
    assert "\n" in text and all(len(line) <= 170 for line in text.splitlines())
    assert footer(two_seed_result(pick=None, reason=None)) == "No recommendation."


def test_needs_log():
    assert not needs_log([30.0, 8.0, None])
    assert needs_log([30.0, 1.0])
    assert not needs_log([30.0, 0.0])


def test_stack_labels_moves_only_overlapping_labels_and_keeps_them_under_the_top():
    # Two labels on one spot and one far away: the upper of the pair goes just above the other.
    assert stack_labels([(0, 10, 30, 8), (5, 12, 30, 8), (100, 10, 30, 8)], gap=1) == [0, 7, 0]
    # Above would cross the top: it goes just below instead.
    assert stack_labels([(0, 10, 30, 8), (5, 12, 30, 8)], top=25, gap=1) == [0, -11]
    assert stack_labels([]) == []


def test_clustered_arms_get_labels_that_do_not_overlap():
    result = two_seed_result()
    for name in ("full", "stem"):  # put both arms on one point
        result["arms"][name]["wall_s"] = stat([10.0, 10.0])
        result["arms"][name]["val_accuracy"] = stat([0.8, 0.8])
    fig = sweep_figure(result)
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if t.get_gid() == "arm-label"]
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the names alone, not their leader lines
    assert len(boxes) >= 2
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
