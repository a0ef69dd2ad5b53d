"""Comparison figures from synthetic results: no training, just the dicts compare.py writes."""

import struct

import pytest

from freezetune.compare.arms import DEPTHS
from freezetune.render.format import size_text
from freezetune.render.plot import (
    GROUP_WIDTH,
    arm_group,
    arm_mode,
    comparison_plot,
    depths_figure,
    frozen_vs_full_figure,
    needs_log,
    sweep_layout,
)

MIB = 1024**2
FULL_FLOPS = 1.0e9


def make_arm(mode="optimized", depth=None, label="frozen ..layer3", step_s=0.02, flops=FULL_FLOPS / 2,
             share=0.5, peak=100 * MIB, opt_state=40 * MIB, loss=(2.3, 2.0), drift=0, legacy=False):
    """One arm as compare.assemble writes it; legacy=True drops the keys older results lack."""
    arm = {
        "label": label, "mode": mode, "depth": depth, "trainable_share": share,
        "params": {"trainable": 1, "frozen": 1, "total": 2},
        "flops_per_step": flops, "flops": {"forward": flops / 3, "backward": 2 * flops / 3, "total": flops},
        "timing": {"step_median_s": step_s, "step_p10_s": step_s * 0.9, "step_p90_s": step_s * 1.2,
                   "step_times_s": [step_s * 0.9, step_s, step_s * 1.2]},
        "memory": {"peak_bytes": peak, "kind": "cpu_peak_rss_growth" if peak is not None else "not measured"},
        "optimizer_state_bytes": opt_state,
        "loss": {"first": loss[0], "last": loss[1]},
        "frozen_batchnorm_drift": {"layers_checked": 5, "layers_changed": drift, "changed": []},
    }
    if mode == "cached":
        arm["cache"] = {"cache_fill_s": 0.01, "cache_bytes": 4096}
        arm["loss_max_abs_diff_vs_optimized"] = 0.0
    if legacy:
        for key in ("mode", "depth", "frozen_batchnorm_drift"):
            del arm[key]
    return arm


def finish(arms: dict, kind: str, skipped=()) -> dict:
    """Adds the speedups (against the first arm) and the result's header fields."""
    base = next(iter(arms.values()))
    for arm in arms.values():
        arm["speedup"] = {"measured": base["timing"]["step_median_s"] / arm["timing"]["step_median_s"],
                          "flop_predicted": base["flops_per_step"] / arm["flops_per_step"]}
    return {
        "kind": kind, "model": "resnet18", "device": "cpu (2 threads)",
        "versions": {"torch": "2.x"}, "data": {"image_size": 32, "batch_size": 4},
        "steps": {"timed": 3, "warmup": 1, "block": 1},
        "skipped": [{"arm": a, "reason": "test"} for a in skipped],
        "arms": arms,
    }


def depths_result(modes=("plain", "optimized", "cached"), legacy=False, peak=100 * MIB) -> dict:
    arms = {"full": make_arm("full", None, "all trainable", 0.02, FULL_FLOPS, 1.0, peak, legacy=legacy)}
    for i, stage in enumerate(DEPTHS):
        label = "fc only" if stage == "layer4" else f"frozen ..{stage}"
        share = 0.0005 if stage == "layer4" else 1 - 0.2 * i
        opt_state = 20 * 1024 if stage == "layer4" else 40 * MIB
        step = 0.02 / (1 + 0.5 * i)
        flops = FULL_FLOPS / (1 + 0.5 * i)
        for mode in modes:
            name = stage if mode == "optimized" else f"{stage}:{mode}"
            cached = mode == "cached"
            arms[name] = make_arm(
                mode, stage, label, step / (80 if cached and stage == "layer4" else 1.5 if cached else 1),
                flops / (10_000 if cached and stage == "layer4" else 2 if cached else 1), share, peak, opt_state,
                drift=5 if mode == "plain" else 0, legacy=legacy)
    return finish(arms, "depths")


def frozen_vs_full_result(modes=("plain", "optimized", "cached"), legacy=False) -> dict:
    arms = {"full": make_arm("full", None, "all trainable", 0.02, FULL_FLOPS, 1.0, legacy=legacy)}
    for mode in modes:
        name = "frozen" if mode == "optimized" else f"frozen:{mode}"
        arms[name] = make_arm(mode, None, "frozen ..layer3", 0.01 / (3 if mode == "cached" else 1),
                              FULL_FLOPS / (4 if mode == "cached" else 2), 0.25, legacy=legacy)
    result = finish(arms, "frozen-vs-full", skipped=[] if "cached" in modes else ["frozen:cached"])
    if "plain" in modes:
        result["arms"]["frozen"]["speedup"]["vs_plain"] = 1.0
    return result


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def labels_top_down(ax) -> list[str]:
    pairs = zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True)
    return [text for _, text in sorted(pairs, reverse=True)]


def axis(fig, title_start: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title_start))


# --------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(("name", "arm", "expected"), [
    ("layer3:plain", {"mode": "plain"}, "plain"),
    ("full", {}, "full"),
    ("full", {"mode": None}, "full"),
    ("layer3", {}, "optimized"),
    ("frozen", {}, "optimized"),
    ("layer3:cached", {}, "cached"),
    ("custom:thing", {}, "optimized"),
])
def test_arm_mode(name, arm, expected):
    assert arm_mode(name, arm) == expected


def test_arm_group_prefers_depth_then_name():
    assert arm_group("anything", {"depth": "layer2"}) == "layer2"
    assert arm_group("layer2:cached", {"depth": None}) == "layer2"
    assert arm_group("layer4", {}) == "layer4"


def test_sweep_layout_all_modes():
    sweep = sweep_layout(depths_result()["arms"])
    assert sweep.baseline == "full"
    assert sweep.groups == list(DEPTHS)
    assert sweep.modes == ["plain", "optimized", "cached"]
    assert sweep.cells[("layer3", "plain")] == "layer3:plain"
    assert sweep.cells[("layer3", "optimized")] == "layer3"
    assert sweep.cells[("layer3", "cached")] == "layer3:cached"
    assert len(sweep.cells) == 3 * len(DEPTHS)
    # Same slot in every group: plain left of centre, optimized centred, cached right.
    assert sweep.offset("plain") == pytest.approx(-GROUP_WIDTH / 3)
    assert sweep.offset("optimized") == pytest.approx(0)
    assert sweep.offset("cached") == pytest.approx(GROUP_WIDTH / 3)
    assert [x for x, _ in sweep.bars("cached")] == pytest.approx([i + GROUP_WIDTH / 3 for i in range(5)])


def test_sweep_layout_subset_and_missing_cells():
    arms = depths_result(modes=("optimized", "cached"))["arms"]
    del arms["layer1:cached"]  # a cached arm the comparison skipped
    sweep = sweep_layout(arms)
    assert sweep.modes == ["optimized", "cached"]
    assert sweep.width == pytest.approx(GROUP_WIDTH / 2)
    assert [n for _, n in sweep.bars("cached")] == ["stem:cached", "layer2:cached", "layer3:cached",
                                                     "layer4:cached"]
    assert [x for x, _ in sweep.bars("cached")][0] == pytest.approx(GROUP_WIDTH / 4)  # group 0, right slot
    assert ("layer1", "cached") not in sweep.cells


def test_sweep_layout_orders_groups_shallowest_first():
    arms = {name: {"mode": "optimized", "depth": name} for name in ("layer4", "custom", "stem", "layer2")}
    arms["full"] = {"mode": "full", "depth": None}
    sweep = sweep_layout(arms)
    assert sweep.groups == ["stem", "layer2", "layer4", "custom"]
    assert sweep.baseline == "full"


def test_sweep_layout_of_legacy_result():
    sweep = sweep_layout(depths_result(modes=("optimized",), legacy=True)["arms"])
    assert sweep.baseline == "full"
    assert sweep.modes == ["optimized"]
    assert sweep.groups == list(DEPTHS)
    assert sweep.offset("optimized") == 0


def test_needs_log():
    assert needs_log([1.0, 25.0])
    assert not needs_log([1.0, 3.0, 19.0])
    assert not needs_log([None, 0, -5, 30.0])  # one usable value: nothing to compare
    assert needs_log([0.5, None, 11.0])
    assert not needs_log([1.0, 50.0], ratio=100)


def test_size_text():
    assert size_text(512) == "512 B"
    assert size_text(20 * 1024) == "20.0 KiB"
    assert size_text(int(42.5 * MIB)) == "42.5 MiB"
    assert size_text(3 * 1024**3) == "3.00 GiB"


# --------------------------------------------------------------------------------------------
# Figures


def test_depths_all_modes(tmp_path):
    result = depths_result()
    fig = depths_figure(result)
    speed = axis(fig, "Speedup")
    # Cached layer4 is 80x faster: log scale, one bar per frozen arm, grouped by mode.
    assert speed.get_yscale() == "log"
    assert axis(fig, "Step time").get_yscale() == "log"
    assert len(speed.containers) == 3
    assert sum(len(c) for c in speed.containers) == 15
    legend = [t.get_text() for t in speed.get_legend().get_texts()]
    assert {"plain loop (requires_grad=False)", "freezetune", "freezetune + feature cache"} <= set(legend)
    # The 30000x cached prediction is drawn at the top of the axis, not stretching it, and labelled.
    assert speed.get_ylim()[1] < 30_000
    assert any("30000x" in t.get_text() and "predicted" in t.get_text() for t in speed.texts)
    assert any(t.get_text() == "240x" for t in speed.texts)  # measured values annotated (cached layer4)
    assert [t.get_text().split("\n")[0] for t in speed.get_xticklabels()] == [
        "stem", "layer1", "layer2", "layer3", "layer4 (fc only)"]
    loss_legend = [t.get_text() for t in axis(fig, "Training loss").get_legend().get_texts()]
    assert "frozen BatchNorm statistics drifted" in loss_legend  # the plain arms drifted

    path = comparison_plot(result, tmp_path / "depths.png")
    assert png_size(path) == (14 * 110, int(9.5 * 110))
    assert path.stat().st_size > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["depths.png"]  # no temporary file left


def test_depths_subset_without_plain_or_cached(tmp_path):
    result = depths_result(modes=("optimized",), peak=None)
    fig = depths_figure(result)
    speed = axis(fig, "Speedup")
    assert speed.get_yscale() == "linear"  # at most 3x: the small differences stay readable
    assert len(speed.containers) == 1
    legend = [t.get_text() for t in speed.get_legend().get_texts()]
    assert "freezetune" in legend
    assert not {"plain loop (requires_grad=False)", "freezetune + feature cache"} & set(legend)
    assert "not measured" in axis(fig, "Memory").get_title()
    # fc only keeps 20 KiB of optimizer state beside 40 MiB: written out, since its bar is invisible.
    assert any(t.get_text() == "20.0 KiB" for t in axis(fig, "Memory").texts)
    assert png_size(comparison_plot(result, tmp_path / "d.png"))[0] == 14 * 110


def test_depths_legacy_result_without_modes(tmp_path):
    result = depths_result(modes=("optimized",), legacy=True)
    fig = depths_figure(result)
    speed = axis(fig, "Speedup")
    assert sum(len(c) for c in speed.containers) == len(DEPTHS)  # full is the 1x line, not a bar
    path = comparison_plot(result, tmp_path / "old.png")
    assert path.stat().st_size > 20_000


def test_frozen_vs_full_labels_modes(tmp_path):
    result = frozen_vs_full_result()
    fig = frozen_vs_full_figure(result)
    ticks = labels_top_down(axis(fig, "Step time"))
    assert [t.split("\n")[0] for t in ticks] == [
        "full fine-tuning", "plain loop (requires_grad=False)", "freezetune", "freezetune + feature cache"]
    assert "frozen:plain: frozen ..layer3" in ticks[1]
    assert len(fig.axes) == 3
    texts = [t.get_text() for t in axis(fig, "Step time").texts]
    assert any("vs plain" in t for t in texts)
    path = comparison_plot(result, tmp_path / "compare.png")
    assert path.stat().st_size > 20_000


def test_frozen_vs_full_subset_and_legacy(tmp_path):
    result = frozen_vs_full_result(modes=("optimized",), legacy=True)
    fig = frozen_vs_full_figure(result)
    ticks = [t.split("\n")[0] for t in labels_top_down(axis(fig, "Step time"))]
    assert ticks == ["full fine-tuning", "freezetune"]
    assert "frozen:cached (test)" in fig.get_suptitle()  # the skipped arm is named
    assert png_size(comparison_plot(result, tmp_path / "c.png"))[1] > 200
