"""What ``freezetune evaluate`` shows: the headline table, per-class accuracy, and the confusion matrix figure.

Everything reads the plain ``eval.json`` record (see :mod:`freezetune.evaluation`). The figure is
drawn on a bare :class:`matplotlib.figure.Figure` (Agg), never through pyplot. It stays readable
from 2 to a few hundred classes: cells are coloured by the share of their true class, counts are
written in the cells while they fit, and every class keeps its tick label, sized to the grid.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from rich import box
from rich.markup import escape
from rich.table import Table

from freezetune.atomic import atomic_write
from freezetune.render.format import fmt_int, fmt_seconds

DPI = 110
CMAP = "Blues"
INK = "#222222"
ANNOTATE_MAX = 25  # classes up to which each cell shows its count
LABEL_CHARS = 18  # class names are cut to this many characters on the axes
ALL_ROWS_MAX = 25  # classes up to which the per-class table lists all; beyond, the weakest
WEAKEST = 10


# --------------------------------------------------------------------------------------------
# Tables


def eval_table(result: dict) -> Table:
    """The headline: what was evaluated, with which weights, and top-1, top-k and loss."""
    table = Table(title=f"Evaluation of {escape(Path(result['run_dir']).name)} ({result['model']})",
                  title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("weights", escape(f"{result['weights']} ({result['weights_kind']}"
                                    + (f", step {result['step']})" if result["step"] is not None else ")")))
    table.add_row("data", escape(data_text(result["data"])))
    n, secs = result["samples"], result["seconds"]
    table.add_row("samples", f"{fmt_int(n)} in {len(result['classes'])} classes "
                  f"({fmt_seconds(secs)}, {result['device']}, {result['precision']}, batch {result['batch_size']})")
    table.add_row("top-1 accuracy", _count(result["top1"], n))
    k = result["top5"]["k"]
    note = f" [dim](only {k} classes: always 100%)[/]" if k < 5 else ""
    table.add_row(f"top-{k} accuracy", _count(result["top5"], n) + note)
    table.add_row("loss", f"{result['loss']:.4f}")
    check = summary_line(result)
    if check:
        table.add_row("summary.json", check)
    return table


def data_text(data: dict) -> str:
    """``the run's val split (synthetic)`` or the folder evaluated."""
    if data["kind"] == "split":
        where = data["source"] if data["root"] is None else f"{data['source']} {data['root']}"
        return f"the run's {data['split']} split ({where})"
    return f"folder {data['root']}"


def summary_line(result: dict) -> str | None:
    """Whether top-1 equals the accuracy the run itself recorded at this step; None if it cannot be said."""
    s = result.get("summary")
    if not s or s.get("val_accuracy") is None:
        return None
    same = s["val_accuracy"] == result["top1"]["accuracy"]
    verdict = "[green]same accuracy[/]" if same else "[yellow]differs[/]"
    return f"{verdict}: val.accuracy {s['val_accuracy']:.4f}, val.loss {s['val_loss']:.4f} at step {s['step']}"


def per_class_table(result: dict) -> Table:
    """One row per class (the weakest ones past :data:`ALL_ROWS_MAX` classes) and its most frequent mistake."""
    rows = list(enumerate(result["per_class"]))
    shown = rows
    if len(rows) > ALL_ROWS_MAX:
        shown = sorted((r for r in rows if r[1]["samples"]), key=lambda r: (r[1]["accuracy"], r[0]))[:WEAKEST]
    title = "Per class" if shown is rows else (f"Per class: the {len(shown)} lowest accuracies of "
                                               f"{len(rows)} (all in eval.json)")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("class", "left"), ("samples", "right"), ("correct", "right"), ("accuracy", "right"),
                         ("loss", "right"), ("most often taken for", "left")):
        table.add_column(col, justify=justify)
    for i, row in shown:
        table.add_row(escape(row["name"]), fmt_int(row["samples"]), fmt_int(row["correct"]),
                      "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}",
                      "-" if row["loss"] is None else f"{row['loss']:.4f}", escape(top_mistake(result, i)))
    return table


def top_mistake(result: dict, i: int) -> str:
    """The class most often predicted for true class ``i`` other than itself, with its count, or ``-``."""
    row = result["confusion"][i]
    j = max((j for j in range(len(row)) if j != i), key=lambda j: row[j], default=None)
    if j is None or row[j] == 0:
        return "-"
    return f"{result['classes'][j]} ({row[j]})"


def notes_lines(result: dict) -> list[str]:
    """The notes, as console lines."""
    return [f"[yellow]note:[/] {escape(n)}" for n in result.get("notes") or []]


def files_line(paths: list[Path]) -> str:
    """The files written."""
    return "wrote " + ", ".join(escape(str(p)) for p in paths)


def _count(top: dict, n: int) -> str:
    return f"{top['accuracy']:.2%} ({fmt_int(top['correct'])}/{fmt_int(n)})"


# --------------------------------------------------------------------------------------------
# The confusion matrix


def confusion_plot(result: dict, path: str | Path) -> Path:
    """Draws the confusion matrix to a PNG (atomically); returns the path."""
    fig = confusion_figure(result)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def confusion_figure(result: dict) -> Figure:
    """Rows are true classes, columns predictions; a cell's colour is its share of the row.

    Shares rather than counts, so that a small class's mistakes show as plainly as a large one's.
    The per-class accuracy is written at the right end of each row.
    """
    conf, names = result["confusion"], [_cut(c) for c in result["classes"]]
    n = len(names)
    shares = [[c / max(1, sum(row)) for c in row] for row in conf]
    side = min(22.0, max(6.0, 2.8 + 0.19 * n))
    fig = Figure(figsize=(side + 1.6, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.6, pad=0.1, label="share of the true class")
    font = _tick_font(n)
    ax.set_xticks(range(n), names, fontsize=font, rotation=90 if n > 8 else 45, ha="center" if n > 8 else "right")
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= ANNOTATE_MAX:
        _annotate(ax, conf, shares, n)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(n), [_acc(r["accuracy"]) for r in result["per_class"]], fontsize=font)
    right.set_ylabel("accuracy of the class")
    right.tick_params(length=0)
    fig.suptitle(figure_title(result), fontsize=11)
    return fig


def figure_title(result: dict) -> str:
    """Model, run, data, and the headline figures."""
    k = result["top5"]["k"]
    step = f", step {result['step']}" if result["step"] is not None else ""
    return (f"{result['model']} {Path(result['run_dir']).name}{step} on {data_text(result['data'])}\n"
            f"top-1 {result['top1']['accuracy']:.1%}, top-{k} {result['top5']['accuracy']:.1%}, "
            f"loss {result['loss']:.3f} ({fmt_int(result['samples'])} images)")


def _annotate(ax, conf: list[list[int]], shares: list[list[float]], n: int) -> None:
    """Counts in the cells (zeros left blank), white on dark cells."""
    size = 9 if n <= 10 else 7 if n <= 16 else 5.5
    for i, row in enumerate(conf):
        for j, count in enumerate(row):
            if count:
                color = "white" if shares[i][j] > 0.55 else INK
                ax.text(j, i, fmt_int(count), ha="center", va="center", fontsize=size, color=color)


def _tick_font(n: int) -> float:
    return 9 if n <= 20 else 7 if n <= 50 else 5.5


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _cut(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"
