"""Figures of a comparison: what freezing buys, at a glance.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (Agg), never through pyplot, so
plotting neither needs a display nor changes the backend of a caller's own matplotlib session.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from freezetune.runfolder import atomic_write

MEASURED = "#d1495b"  # measured figures: warm red
PREDICTED = "#00798c"  # FLOP arithmetic: teal
FORWARD, BACKWARD = "#30638e", "#9fc2e0"
MIB = 1024**2


def comparison_plot(result: dict, path: str | Path) -> Path:
    """Draws a comparison result to a PNG: two-arm layout for frozen-vs-full, a sweep for depths.

    Args:
        result: What :func:`freezetune.compare.frozen_vs_full` or ``depths`` returned.
        path: The PNG to write (atomically).

    Returns:
        The path written.
    """
    fig = depths_figure(result) if result.get("kind") == "depths" else frozen_vs_full_figure(result)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


def frozen_vs_full_figure(result: dict) -> Figure:
    """Step time, FLOPs per step and peak memory of each arm, side by side, with the speedups."""
    arms = result["arms"]
    names = list(arms)
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax_time, ax_flops, ax_mem = fig.subplots(1, 3)
    y = list(range(len(names)))[::-1]  # first arm (full) on top
    labels = [f"{n}\n{arms[n]['label']}" for n in names]

    medians = [_ms(arms[n]["timing"]["step_median_s"]) for n in names]
    lo = [m - _ms(arms[n]["timing"]["step_p10_s"]) for m, n in zip(medians, names, strict=True)]
    hi = [_ms(arms[n]["timing"]["step_p90_s"]) - m for m, n in zip(medians, names, strict=True)]
    ax_time.barh(y, medians, color=MEASURED, alpha=0.85, xerr=[lo, hi], capsize=4)
    for yi, n in zip(y, names, strict=True):
        steps = [s * 1000 for s in arms[n]["timing"].get("step_times_s", [])]
        ax_time.plot(steps, [yi] * len(steps), "k.", alpha=0.35, markersize=4)
    ax_time.set_title("Step time (median, whiskers p10-p90, dots = steps)")
    ax_time.set_xlabel("ms per training step")
    ends = [max([m + h, *(s * 1000 for s in arms[n]["timing"].get("step_times_s", []))])
            for m, h, n in zip(medians, hi, names, strict=True)]
    _label_bars(ax_time, y, ends, [_times(arms[n]["speedup"]["measured"], "faster") for n in names])

    fwd = [arms[n]["flops"]["forward"] / 1e9 for n in names]
    bwd = [arms[n]["flops"]["backward"] / 1e9 for n in names]
    ax_flops.barh(y, fwd, color=FORWARD, label="forward")
    ax_flops.barh(y, bwd, left=fwd, color=BACKWARD, label="backward")
    ax_flops.set_title("FLOPs per training step")
    ax_flops.set_xlabel("GFLOPs (multiply-add = 2)")
    ax_flops.legend(loc="lower right", fontsize=8)
    totals = [f + b for f, b in zip(fwd, bwd, strict=True)]
    _label_bars(ax_flops, y, totals, [_times(arms[n]["speedup"]["flop_predicted"], "predicted") for n in names])

    _memory_bars(ax_mem, y, names, arms, horizontal=True)
    for ax in (ax_time, ax_flops, ax_mem):
        ax.set_yticks(y, labels if ax is ax_time else [""] * len(y))
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_title(result, "frozen vs full"), fontsize=11)
    return fig


def depths_figure(result: dict) -> Figure:
    """The depth sweep: speedup (measured vs FLOPs), step time, memory and loss per freeze point."""
    arms = result["arms"]
    names = list(arms)
    x = list(range(len(names)))
    ticks = [f"{n}{' (fc only)' if arms[n]['label'] == 'fc only' else ''}\n"
             f"{share_text(arms[n]['trainable_share'])} trainable" for n in names]
    fig = Figure(figsize=(13, 8), layout="constrained")
    (ax_speed, ax_time), (ax_mem, ax_loss) = fig.subplots(2, 2)

    width = 0.38
    measured = [arms[n]["speedup"]["measured"] or 0 for n in names]
    predicted = [arms[n]["speedup"]["flop_predicted"] or 0 for n in names]
    ax_speed.bar([i - width / 2 for i in x], measured, width, color=MEASURED, label="measured")
    ax_speed.bar([i + width / 2 for i in x], predicted, width, color=PREDICTED, label="FLOP-predicted")
    ax_speed.axhline(1, color="k", lw=0.8)
    for i, (m, p) in enumerate(zip(measured, predicted, strict=True)):
        ax_speed.annotate(f"{m:.2f}x", (i - width / 2, m), ha="center", va="bottom", fontsize=8)
        ax_speed.annotate(f"{p:.2f}x", (i + width / 2, p), ha="center", va="bottom", fontsize=8)
    ax_speed.set_title("Speedup over full fine-tuning (higher is better)")
    ax_speed.set_ylabel("x faster per step")
    ax_speed.legend(fontsize=8)

    medians = [_ms(arms[n]["timing"]["step_median_s"]) for n in names]
    lo = [m - _ms(arms[n]["timing"]["step_p10_s"]) for m, n in zip(medians, names, strict=True)]
    hi = [_ms(arms[n]["timing"]["step_p90_s"]) - m for m, n in zip(medians, names, strict=True)]
    ax_time.bar(x, medians, color=MEASURED, alpha=0.85, yerr=[lo, hi], capsize=4)
    ax_time.set_title("Step time (median, whiskers p10-p90)")
    ax_time.set_ylabel("ms per training step")

    _memory_bars(ax_mem, x, names, arms, horizontal=False)

    first = [arms[n]["loss"]["first"] for n in names]
    last = [arms[n]["loss"]["last"] for n in names]
    ax_loss.bar(x, last, color="#edae49", label="last step")
    ax_loss.plot(x, first, "kD", markersize=5, label="first step")
    steps = result["steps"]["timed"] + result["steps"]["warmup"]
    ax_loss.set_title(f"Training loss after the same {steps} steps (lower is better)")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(fontsize=8)

    for ax in (ax_speed, ax_time, ax_mem, ax_loss):
        ax.set_xticks(x, ticks, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax_loss.set_xlabel("frozen through (trainable share of parameters)")
    fig.suptitle(_title(result, "depth sweep"), fontsize=11)
    return fig


def _memory_bars(ax, pos: list[int], names: list[str], arms: dict, horizontal: bool) -> None:
    peaks = [arms[n]["memory"]["peak_bytes"] for n in names]
    opt = [arms[n]["optimizer_state_bytes"] / MIB for n in names]
    bar = ax.barh if horizontal else ax.bar
    kind = arms[names[0]]["memory"]["kind"]
    measured = all(p is not None for p in peaks)
    if measured:
        bar(pos, [p / MIB for p in peaks], color="#66a182", label="peak memory")
        what = {"cpu_peak_rss_growth": "peak RSS growth while training",
                "cuda_max_allocated": "CUDA max allocated"}.get(kind, kind)
        ax.set_title(f"Memory ({what})")
    else:
        ax.set_title("Memory")
        ax.text(0.5, 0.6, f"peak memory {kind}", ha="center", va="center", transform=ax.transAxes)
    bar(pos, opt, color="#2e4057", label="optimizer state" + (" (part of peak)" if measured else ""))
    (ax.set_xlabel if horizontal else ax.set_ylabel)("MiB")
    ax.legend(fontsize=8, loc="lower right" if horizontal else "upper right")


def share_text(share: float) -> str:
    """A trainable share as a percentage with enough digits to tell 0.02% from 0%."""
    pct = 100 * share
    return f"{pct:.0f}%" if pct >= 99.95 or pct == 0 else f"{pct:.1f}%" if pct >= 1 else f"{pct:.2f}%"


def _label_bars(ax, pos: list[int], ends: list[float], texts: list[str]) -> None:
    for p, end, text in zip(pos, ends, texts, strict=True):
        if text:
            ax.annotate(f"  {text}", (end, p), va="center", fontsize=9, fontweight="bold")


def _times(value: float | None, what: str) -> str:
    return "" if value is None or abs(value - 1) < 1e-9 else f"{value:.2f}x {what}"


def _ms(seconds: float | None) -> float:
    return 0.0 if seconds is None else seconds * 1000


def _title(result: dict, what: str) -> str:
    d = result["data"]
    return (f"{result['model']} {what} | {result['device']} | {d['image_size']}px, batch {d['batch_size']} | "
            f"{result['steps']['timed']} timed steps/arm | torch {result['versions']['torch']}")
