"""The figure of a freeze sweep: what each freeze configuration costs and what accuracy it reaches.

Two panels share one colour per arm (matplotlib's tab10, in the result's arm order): on the left
each arm's final validation accuracy against its training time, with the Pareto front and the
recommended arm; in the middle each arm's accuracy after every epoch against the training seconds
spent so far. With the memory pass, a third panel on the right puts the final accuracy against
each arm's peak memory, with its own Pareto front. Drawn on a bare :class:`matplotlib.figure.Figure`
(Agg), never through pyplot, from the sweep record alone (a plain dict), so this module imports no
sweep code.
"""

from __future__ import annotations

import statistics
import textwrap
from itertools import accumulate
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

from freezetune.atomic import atomic_write

FIGSIZE = (13, 5)
FIGSIZE_WITH_MEMORY = (19, 5)
MIB = 2**20
DPI = 120
PALETTE = "tab10"
MUTED = "#8c8c8c"  # pruned arms' error bars and labels
INK = "#222222"  # Pareto front, recommendation ring, target line
FOOTER_WIDTH = 170  # characters per line of the recommendation's reason under the figure
# The time axes switch to a log scale when the slowest arm takes this many times the fastest.
LOG_RATIO = 20.0
ARM_LABEL = "arm-label"  # the gid of the cost panel's arm names, which are kept from overlapping


def sweep_plot(result: dict, path: str | Path) -> Path:
    """Draws a sweep result to a PNG: accuracy against training cost, and accuracy over training time.

    Args:
        result: The sweep record (what ``sweep.json`` holds).
        path: The PNG to write (atomically).

    Returns:
        The path written.
    """
    fig = sweep_figure(result)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def sweep_figure(result: dict) -> Figure:
    """The sweep figure: cost against accuracy per arm (left), accuracy curves over training time (right)."""
    colors = arm_colors(result["arms"])
    memory = bool(result.get("memory_pareto"))
    fig = Figure(figsize=FIGSIZE_WITH_MEMORY if memory else FIGSIZE, layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to measure the labels with (see _separate_labels)
    axes = list(fig.subplots(1, 3 if memory else 2))
    ax_cost, ax_curve = axes[:2]
    _cost_panel(ax_cost, result, colors)
    _curve_panel(ax_curve, result, colors)
    memory_ax = axes[2] if memory else None
    if memory_ax is not None:
        _memory_panel(memory_ax, result, colors)
    log = needs_log([arm["wall_s"].get("mean") for arm in result["arms"].values()])
    for ax in axes:
        _target_line(ax, result.get("target_accuracy"))
        _percent_axis(ax)
        ax.grid(alpha=0.3)
        if log and ax is not memory_ax:  # the time axes
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10 rather than 10^0
        else:
            ax.set_xlim(left=0)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="lower right")
    scale = ", log scale" if log else ""
    ax_cost.set_xlabel(f"training time, s (mean over seeds{scale})")
    ax_curve.set_xlabel(f"training time so far, s (mean over seeds{scale})")
    fig.suptitle(sweep_title(result), fontsize=12)
    fig.supxlabel(footer(result), fontsize=9, color=INK)
    for ax in axes[::2]:  # the panels with arm names: cost, and memory
        _separate_labels(fig, [t for t in ax.texts if t.get_gid() == ARM_LABEL])
    return fig


def stack_labels(boxes: list[tuple[float, float, float, float]], top: float | None = None,
                 gap: float = 1.0) -> list[float]:
    """How far to move each label up (or down) so that no two overlap. Pure.

    Arms whose points sit close together (full fine-tuning, frozen ..stem and adaptive freezing
    often do) would print their names over each other. Labels are taken bottom first; each stays
    where it is if it is free, and otherwise goes just above the labels it would overlap, or just
    below them where above would cross ``top``.

    Args:
        boxes: Each label's ``(x0, y0, width, height)``, in one unit (display pixels).
        top: The highest a label may reach (the panel's top edge), or None for no limit.
        gap: Space left between stacked labels, in that unit.

    Returns:
        The vertical shift of each label, in the order given (0.0 for a label that stays).
    """
    placed: list[tuple[float, float, float, float]] = []
    shifts = [0.0] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0])):
        x0, y0, w, h = boxes[i]
        y = _free_y(boxes[i], placed, gap, up=True)
        if top is not None and y + h > top:
            y = _free_y(boxes[i], placed, gap, up=False)
        placed.append((x0, y, w, h))
        shifts[i] = y - y0
    return shifts


def _free_y(box: tuple[float, float, float, float], placed: list, gap: float, up: bool) -> float:
    """The nearest free height for ``box`` among the ``placed`` boxes, searching up or down."""
    x0, y, w, h = box
    while hits := [b for b in placed if x0 < b[0] + b[2] and b[0] < x0 + w and y < b[1] + b[3] and b[1] < y + h]:
        y = max(b[1] + b[3] for b in hits) + gap if up else min(b[1] for b in hits) - h - gap
    return y


def _separate_labels(fig: Figure, labels: list) -> None:
    """Moves overlapping arm labels apart (see :func:`stack_labels`); a moved one gets a leader line."""
    if len(labels) < 2:
        return
    fig.draw_without_rendering()  # the layout, and so every label's place, is final only now
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    top = labels[0].axes.get_window_extent(renderer).y1
    shifts = stack_labels([(b.x0, b.y0, b.width, b.height) for b in boxes], top=top)
    for label, dy in zip(labels, shifts, strict=True):
        if dy:
            dx, y = label.xyann
            label.xyann = (dx, y + dy * 72 / fig.dpi)  # display pixels to offset points
            label.arrow_patch.set_visible(True)


def sweep_title(result: dict) -> str:
    """The figure's title: the model, the question, seeds and epochs."""
    return (f"{result['model']}: which layers to freeze? "
            f"({len(result['seeds'])} seed(s), {result['epochs']} epochs)")


def footer(result: dict) -> str:
    """The recommendation's reason, wrapped to fit under the figure."""
    rec = result.get("recommendation") or {}
    if rec.get("arm") is None:
        text = "No recommendation" + (f": {rec['reason']}" if rec.get("reason") else ".")
    else:
        text = f"Recommended: {rec['arm']}" + (f". {rec['reason']}" if rec.get("reason") else "")
    return textwrap.fill(text, FOOTER_WIDTH)


def arm_colors(arms: dict) -> dict[str, tuple]:
    """One fixed colour per arm, in the result's arm order (cycling through tab10 past ten arms)."""
    palette = colormaps[PALETTE].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(arms)}


def needs_log(values, ratio: float = LOG_RATIO) -> bool:
    """Whether positive values span more than ``ratio`` (max over min); None and non-positive values are ignored."""
    vals = [v for v in values if v is not None and v > 0]
    return len(vals) > 1 and max(vals) / min(vals) > ratio


def arm_point(arm: dict) -> tuple[float, float] | None:
    """An arm's (mean training seconds, mean final accuracy), or None where either is unknown."""
    x, y = arm["wall_s"].get("mean"), arm["val_accuracy"].get("mean")
    return None if x is None or y is None else (x, y)


def arm_curve(arm: dict) -> tuple[list[float], list[float]]:
    """An arm's mean accuracy after each epoch against the mean training seconds spent up to that epoch.

    The seconds are averaged over seeds epoch by epoch, for as many epochs as the shortest seed
    ran; both lists are cut to the shorter of the two. An unknown accuracy is NaN (a gap).
    """
    walls = [s.get("epoch_wall_s") or [] for s in arm.get("seeds") or []]
    epochs = min((len(w) for w in walls), default=0)
    xs = list(accumulate(statistics.fmean(w[i] for w in walls) for i in range(epochs)))
    ys = [float("nan") if a is None else a for a in arm.get("val_accuracy_by_epoch") or []]
    n = min(len(xs), len(ys))
    return xs[:n], ys[:n]


def _cost_panel(ax, result: dict, colors: dict) -> None:
    """Final accuracy against training time, one point per arm, with the Pareto front and the pick."""
    arms = result["arms"]
    points = {name: p for name, arm in arms.items() if (p := arm_point(arm)) is not None}
    for name, (x, y) in points.items():
        _arm_point(ax, name, arms[name], (x, y), colors[name])
    front = [points[n] for n in result.get("pareto") or [] if n in points]
    if front:
        # The best accuracy reachable in a given time: the front holds on past its costliest arm.
        front.append((max(x for x, _ in points.values()), front[-1][1]))
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color=INK, lw=1.2, alpha=0.6,
                zorder=1, label="Pareto front")
    pick = (result.get("recommendation") or {}).get("arm")
    if pick in points:
        ax.plot(*points[pick], "o", ms=18, mfc="none", mec=INK, mew=2, zorder=4)
        ax.plot([], [], "o", ms=11, mfc="none", mec=INK, mew=2, label="recommended")  # a legend-sized ring
    if any(arms[n].get("status") == "pruned" for n in points):
        ax.plot([], [], "o", ms=8, mfc="white", mec=MUTED, mew=1.8, label="pruned (stopped early)")  # legend only
    ax.margins(x=0.15, y=0.12)
    ax.set_title("Final accuracy vs training cost (up and left is better)", fontsize=10)
    ax.set_ylabel("final validation accuracy (mean ± sd over seeds)")


def _arm_point(ax, name: str, arm: dict, xy: tuple[float, float], color) -> None:
    """One arm's point with its sd whiskers and its name; a pruned arm is hollow with a muted label."""
    pruned = arm.get("status") == "pruned"
    ax.errorbar(*xy, xerr=arm["wall_s"].get("sd"), yerr=arm["val_accuracy"].get("sd"), fmt="o", ms=8,
                color=color, mfc="white" if pruned else color, mec=color, mew=1.8,
                ecolor=MUTED if pruned else color, elinewidth=1, capsize=3, zorder=3)
    label = ax.annotate(f"{name} (pruned)" if pruned else name, xy, xytext=(9, 7), textcoords="offset points",
                        fontsize=8.5, color=MUTED if pruned else INK, gid=ARM_LABEL,
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.8, "shrinkA": 0, "shrinkB": 5})
    label.arrow_patch.set_visible(False)  # shown only if the label has to move off a neighbour's


def _memory_panel(ax, result: dict, colors: dict) -> None:
    """Final accuracy against peak memory (MiB, from the memory pass), with its own Pareto front."""
    arms = result["arms"]
    points = {n: (arm["peak_memory_bytes"] / MIB, arm["val_accuracy"]["mean"]) for n, arm in arms.items()
              if arm.get("peak_memory_bytes") is not None and arm["val_accuracy"].get("mean") is not None}
    for name, (x, y) in points.items():
        ax.errorbar(x, y, yerr=arms[name]["val_accuracy"].get("sd"), fmt="o", ms=8, color=colors[name],
                    elinewidth=1, capsize=3, zorder=3)
        label = ax.annotate(name, (x, y), xytext=(9, 7), textcoords="offset points", fontsize=8.5, color=INK,
                            gid=ARM_LABEL, arrowprops={"arrowstyle": "-", "color": colors[name], "lw": 0.8,
                                                       "shrinkA": 0, "shrinkB": 5})
        label.arrow_patch.set_visible(False)
    front = [points[n] for n in result.get("memory_pareto") or [] if n in points]
    if front:
        front.append((max(x for x, _ in points.values()), front[-1][1]))
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color=INK, lw=1.2, alpha=0.6,
                zorder=1, label="Pareto front (memory)")
    ax.margins(x=0.15, y=0.12)
    kind = next((a.get("memory_kind") for a in arms.values() if a.get("memory_kind")), "")
    ax.set_title("Final accuracy vs peak memory (up and left is better)", fontsize=10)
    ax.set_xlabel(f"peak memory, MiB ({kind.replace('_', ' ')})")


def _curve_panel(ax, result: dict, colors: dict) -> None:
    """Accuracy after each epoch against training seconds so far, one line per arm."""
    pick = (result.get("recommendation") or {}).get("arm")
    for name, arm in result["arms"].items():
        xs, ys = arm_curve(arm)
        if not xs:
            continue
        pruned = arm.get("status") == "pruned"
        label = name + (" (pruned)" if pruned else "") + (" (recommended)" if name == pick else "")
        ax.plot(xs, ys, marker="o", color=color_of(colors, name), ms=4, lw=2.8 if name == pick else 1.5,
                ls="--" if pruned else "-", label=label, zorder=3 if name == pick else 2)
        if pruned:
            ax.plot(xs[-1:], ys[-1:], "x", color=color_of(colors, name), ms=10, mew=2.5, zorder=4)
    ax.set_title("Validation accuracy over training time (pruned arms end in x)", fontsize=10)
    ax.set_ylabel("validation accuracy (mean over seeds)")


def color_of(colors: dict, name: str):
    """An arm's colour (grey for a name the colour table lacks)."""
    return colors.get(name, MUTED)


def _percent_axis(ax) -> None:
    """Accuracy ticks as percentages, with a decimal only where the axis spans a few points."""
    low, high = ax.get_ylim()
    span = high - low
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0 if span >= 0.1 else 1 if span >= 0.01 else 2))


def _target_line(ax, target: float | None) -> None:
    if target is not None:
        ax.axhline(target, color=INK, lw=1, ls="--", alpha=0.8, label=f"target ({target:.1%})")
