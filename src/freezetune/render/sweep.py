"""Rich rendering of ``freezetune sweep``: the arms' table, the recommendation, epoch progress.

Everything reads the plain ``sweep.json`` record (see :mod:`freezetune.sweep.result`).
"""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from freezetune.render.format import fmt_bytes, fmt_gflops, fmt_ms, fmt_percent, fmt_seconds


def _pm(stat: dict, fmt, sd_fmt=None) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt(stat["mean"])
    if stat["sd"] is not None:
        text += f" ± {(sd_fmt or fmt)(stat['sd'])}"
    return text


def _acc(x: float) -> str:
    return f"{x:.3f}"


def sweep_table(result: dict) -> Table:
    """One row per arm: accuracy (final, best), time to target, training and validation time, cost figures."""
    d = result["data"]
    seeds = len(result["seeds"])
    target = result["target_accuracy"]
    title = (f"{result['model']} sweep | {result['device']} | {d['image_size']}px, batch {d['batch_size']} | "
             f"{result['epochs']} epochs x {seeds} seed{'s' if seeds > 1 else ''} | target "
             f"{'-' if target is None else f'{target:.3f}'}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("arm", "left"), ("trainable", "right"), ("val acc", "right"), ("best", "right"),
                         ("to target", "right"), ("train", "right"), ("val", "right"), ("step", "right"),
                         ("GFLOPs", "right"), ("peak mem", "right"), ("", "left")):
        table.add_column(col, justify=justify, no_wrap=col in ("arm", ""))
    pick = result["recommendation"]["arm"]
    for name, arm in result["arms"].items():
        table.add_row(*_row(name, arm, pick))
    return table


def _row(name: str, arm: dict, pick: str | None) -> list[str]:
    marks = []
    if name == pick:
        marks.append("[bold green]recommended[/]")
    if arm["on_pareto"]:
        marks.append("pareto")
    if arm["status"] == "pruned":
        marks.append(f"[yellow]pruned after epoch {arm['pruned_at_epoch']}[/]")
    elif arm["status"] != "completed":
        marks.append(f"[red]{arm['status']}[/]")
    label = escape(name) if name == arm["label"] else f"{escape(name)} [dim]({escape(arm['label'])})[/]"
    reached = arm["time_to_target_s"]
    to_target = _pm(reached, fmt_seconds) if reached["mean"] is not None else "never"
    return [
        f"[bold]{label}[/]" if name == pick else label,
        fmt_percent(arm["trainable_pct"]),
        _pm(arm["val_accuracy"], _acc),
        _pm(arm["best_val_accuracy"], _acc),
        to_target,
        _pm(arm["wall_s"], fmt_seconds),
        _pm(arm["val_s"], fmt_seconds),
        fmt_ms(arm["step_s"]["mean"]),
        "-" if arm["flops_per_step"] is None else fmt_gflops(arm["flops_per_step"]),
        fmt_bytes(arm["peak_memory_bytes"]) if arm["peak_memory_bytes"] is not None else "-",
        ", ".join(marks),
    ]


def recommendation_lines(result: dict) -> list[str]:
    """The recommendation and where the files are, as console-markup lines."""
    rec = result["recommendation"]
    lines = []
    if rec["arm"] is None:
        lines.append(f"[bold yellow]no recommendation:[/] {escape(rec['reason'])}")
    else:
        lines.append(f"[bold green]recommendation: {escape(rec['arm'])}[/]. {escape(rec['reason'])}")
    lines.append(f"[dim]train = training time (cache filling included, validation apart); to target = "
                 f"time until validation accuracy first reached {result['target_accuracy']:.3f} "
                 f"({result['target_source']})[/]" if result["target_accuracy"] is not None else "")
    files = result["files"]
    lines.append(f"wrote {files['json']}, {files['csv']} and {files['png']}")
    return [line for line in lines if line]


def epoch_line(arm: str, seed: int, record, epochs: int) -> str:
    """One progress line per (arm, seed, epoch)."""
    acc = "-" if record.val_accuracy is None else f"{record.val_accuracy:.3f}"
    cached = " [dim]cached[/]" if record.cached else ""
    return (f"epoch {record.epoch + 1}/{epochs}  {escape(arm):<10} seed {seed}  val acc {acc}  "
            f"train {fmt_seconds(record.train_s)}{cached}")
