"""``freezetune plot``: training curves of one or more runs, overlaid, for people without TensorBoard.

Four panels over optimizer steps: the loss, the learning rate, the validation accuracy after each
epoch, and the step time. Each run keeps one colour (matplotlib's tab10, in the order given) and
is labelled by its folder name, with as many parent folders as it takes to tell runs apart.

Per-step values are thin lines; the loss gets a rolling mean and the step time a rolling
median over the same window. Step times are noisy and have two regimes: warm-up steps (slow,
untimed in ``summary.json``) are drawn as crosses and left out of the median, and steps that
read the feature cache get their own median, dashed, so the jump at the cached epoch stays a
jump. Epoch ends are dotted verticals in the run's colour; stages ``freeze.auto`` froze are
marked on the loss panel. Drawn on a bare :class:`matplotlib.figure.Figure` (Agg), never
through pyplot, from the dicts :func:`read_run` returns.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from freezetune.atomic import atomic_write
from freezetune.errors import RunDirError
from freezetune.training.run_dir import RunDir
from freezetune.training.summary import EpochRecord

PLOT_NAME = "training.png"
FIGSIZE = (13, 8.5)
DPI = 110
PALETTE = "tab10"
LOG_RATIO = 20.0  # the step-time axis turns logarithmic when its values span this many times
WINDOW_SHARE = 0.05  # the rolling window is this share of a run's steps (at least 1, at most MAX_WINDOW)
MAX_WINDOW = 200


# --------------------------------------------------------------------------------------------
# Reading run folders


def read_run(run_dir: str | Path) -> dict:
    """A run folder's curves as plain lists: its metrics.jsonl steps, epochs.jsonl and freeze events.

    Raises:
        RunDirError: If the folder has no metrics.jsonl or no step logged yet.
    """
    folder = RunDir(run_dir)
    if not folder.metrics.is_file():
        raise RunDirError(f"{folder}: no metrics.jsonl (is this a freezetune run folder?)")
    steps = [r for r in folder.step_rows() if "step" in r]
    if not steps:
        raise RunDirError(f"{folder}: no training step logged yet")
    epochs = [EpochRecord.from_dict(r).as_dict() for r in folder.epoch_rows()]
    return {
        "run_dir": str(folder),
        "step": [r["step"] for r in steps],
        "epoch": [r["epoch"] for r in steps],
        "loss": [r["loss"] for r in steps],
        "lr": [r["lr"] for r in steps],
        "step_time_s": [r["step_time_s"] for r in steps],
        "warmup": [bool(r.get("warmup")) for r in steps],
        "cached": [bool(r.get("cached")) for r in steps],
        "val": [(e["step"], e["val_accuracy"]) for e in epochs if e["val_accuracy"] is not None],
        "freeze_events": [(r["step"], r["stage"]) for r in folder.event_rows() if r.get("event") == "auto_freeze"
                          and "step" in r and "stage" in r],
    }


def run_labels(paths: list[str | Path]) -> list[str]:
    """Folder names, with parent folders added until no two runs share a label.

    ``runs/a/seed-0`` and ``runs/b/seed-0`` become ``a/seed-0`` and ``b/seed-0``.
    """
    parts = [Path(p).resolve().parts for p in paths]
    depth = {i: 1 for i in range(len(parts))}
    while True:
        labels = ["/".join(p[-depth[i]:]) for i, p in enumerate(parts)]
        clashes = {i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])}
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


def epoch_ends(run: dict) -> list[int]:
    """Steps at which an epoch ended, the last step excluded (where the epoch number changes)."""
    return [s for s, e, nxt in zip(run["step"], run["epoch"], run["epoch"][1:], strict=False) if nxt != e]


def window(n: int) -> int:
    """The rolling window for a run of ``n`` steps."""
    return max(1, min(MAX_WINDOW, round(n * WINDOW_SHARE)))


def rolling(values: list[float], size: int, how=statistics.fmean) -> list[float]:
    """``how`` (mean by default) over the last ``size`` values at each position (fewer at the start)."""
    return [how(values[max(0, i - size + 1): i + 1]) for i in range(len(values))]


# --------------------------------------------------------------------------------------------
# The figure


def training_plot(runs: list[dict], labels: list[str], path: str | Path) -> Path:
    """Draws the runs' curves to a PNG (atomically); returns the path."""
    fig = training_figure(runs, labels)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def training_figure(runs: list[dict], labels: list[str]) -> Figure:
    """Loss, learning rate, validation accuracy and step time over steps, one colour per run."""
    palette = colormaps[PALETTE].colors
    colors = [palette[i % len(palette)] for i in range(len(runs))]
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    axes = fig.subplot_mosaic([["loss", "lr"], ["val", "time"]], sharex=True)
    for run, color in zip(runs, colors, strict=True):
        _loss(axes["loss"], run, color)
        _lr(axes["lr"], run, color)
        _val(axes["val"], run, color)
        _step_time(axes["time"], run, color)
        for ax in axes.values():
            for step in epoch_ends(run):
                ax.axvline(step, color=color, lw=0.8, ls=":", alpha=0.5)
    _finish_axes(axes, runs)
    handles = [Line2D([], [], color=c, lw=2, label=lab) for c, lab in zip(colors, labels, strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(runs)), fontsize=9, frameon=False)
    fig.suptitle("Training curves" + (f": {labels[0]}" if len(runs) == 1 else f" of {len(runs)} runs"),
                 fontsize=12)
    return fig


def _loss(ax, run: dict, color) -> None:
    steps, loss = run["step"], run["loss"]
    ax.plot(steps, loss, color=color, lw=0.8, alpha=0.35)
    ax.plot(steps, rolling(loss, window(len(loss))), color=color, lw=1.8)
    for step, stage in run["freeze_events"]:
        ax.annotate(f"froze {stage}", (step, 1), xycoords=("data", "axes fraction"), xytext=(0, -4),
                    textcoords="offset points", rotation=90, ha="center", va="top", fontsize=7, color=color)


def _lr(ax, run: dict, color) -> None:
    ax.plot(run["step"], run["lr"], color=color, lw=1.5, drawstyle="steps-post")


def _val(ax, run: dict, color) -> None:
    if run["val"]:
        ax.plot([s for s, _ in run["val"]], [a for _, a in run["val"]], color=color, lw=1.5, marker="o", ms=4)


def _step_time(ax, run: dict, color) -> None:
    """Per-step times, thin; a rolling median per path (uncached solid, cached dashed); warm-up steps as x."""
    steps, ms = run["step"], [t * 1000 for t in run["step_time_s"]]
    ax.plot(steps, ms, color=color, lw=0.6, alpha=0.3)
    warm = [(s, t) for s, t, w in zip(steps, ms, run["warmup"], strict=True) if w]
    if warm:
        ax.plot([s for s, _ in warm], [t for _, t in warm], "x", color=color, ms=5, mew=1.2)
    size = window(len(steps))
    for cached, style in ((False, "-"), (True, "--")):
        timed = [(s, t) for s, t, w, c in zip(steps, ms, run["warmup"], run["cached"], strict=True)
                 if not w and c == cached]
        if timed:
            ax.plot([s for s, _ in timed], rolling([t for _, t in timed], size, statistics.median), color=color,
                    lw=1.8, ls=style)


def _finish_axes(axes: dict, runs: list[dict]) -> None:
    sizes = sorted({window(len(r["step"])) for r in runs})
    span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    axes["loss"].set_title(f"Training loss (thin: per step; thick: rolling mean over {span} steps)", fontsize=10)
    axes["loss"].set_ylabel("cross-entropy")
    axes["lr"].set_title("Learning rate (first parameter group)", fontsize=10)
    axes["lr"].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    val = axes["val"]
    val.set_title("Validation accuracy after each epoch", fontsize=10)
    val.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    if not any(r["val"] for r in runs):
        val.text(0.5, 0.5, "no validation set", transform=val.transAxes, ha="center", va="center", color="#8c8c8c")
    _time_axis(axes["time"], runs, span)
    for key in ("val", "time"):
        axes[key].set_xlabel("optimizer step (dotted: end of an epoch)")
    for ax in axes.values():
        ax.grid(alpha=0.3)


def _time_axis(ax, runs: list[dict], span: str) -> None:
    timed = [t for r in runs for t, w in zip(r["step_time_s"], r["warmup"], strict=True) if not w]
    everything = [t for r in runs for t in r["step_time_s"]]
    log = _spans(timed or everything)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"Step time (thin: per step; thick: rolling median over {span} steps"
                 + (", log scale)" if log else ")"), fontsize=10)
    ax.set_ylabel("ms per training step")
    proxies = [Line2D([], [], color="#555555", lw=1.8, label="uncached steps")]
    if any(any(r["cached"]) for r in runs):
        proxies.append(Line2D([], [], color="#555555", lw=1.8, ls="--", label="feature-cache steps"))
    if any(any(r["warmup"]) for r in runs):
        proxies.append(Line2D([], [], color="#555555", ls="", marker="x", label="warm-up (not in the median)"))
    ax.legend(handles=proxies, fontsize=8, loc="upper right")


def _spans(values: list[float]) -> bool:
    vals = [v for v in values if v > 0]
    return len(vals) > 1 and max(vals) / min(vals) > LOG_RATIO
