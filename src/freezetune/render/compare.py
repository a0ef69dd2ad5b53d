"""Rich rendering of ``freezetune compare``: the arms side by side, the depth sweep, the headline.

Everything here reads the plain result dicts that :mod:`freezetune.compare.run` returns and
writes to ``compare.json`` / ``depths.json``; the tables fit an 80-column terminal.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from freezetune.render.format import (
    fmt_bytes,
    fmt_count,
    fmt_gflops,
    fmt_ms,
    fmt_percent,
    fmt_rate,
    fmt_seconds,
    fmt_speedup,
    share_text,
)


def _title(result: dict, what: str) -> str:
    d = result["data"]
    return (f"{result['model']} {what} | {result['device']} | {d['image_size']}px, batch "
            f"{d['batch_size']} | {result['steps']['timed']} timed steps/arm (+{result['steps']['warmup']} "
            f"warm-up) | torch {result['versions']['torch']}")


def _left_out(result: dict) -> str:
    skipped = "; ".join(f"{s['arm']}: {s['reason']}" for s in result.get("skipped", []))
    return f"; left out: {skipped}" if skipped else ""


def arms_table(result: dict, title: str) -> Table:
    """One column per arm, one row per figure: parameters, FLOPs, speedups, time, memory, loss.

    Row names and cells are kept short so that full and three frozen modes fit 80 columns.
    """
    arms = result["arms"]
    table = Table(title=_title(result, title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("", no_wrap=True)
    for name in arms:
        table.add_column(name, justify="right")

    def row(what: str, fmt) -> None:
        table.add_row(what, *(fmt(a) for a in arms.values()))

    row("freeze", lambda a: a["label"])
    row("mode", lambda a: a.get("mode", "-"))
    row("trainable", lambda a: f"{fmt_count(a['params']['trainable'])} {share_text(a['trainable_share'])}")
    row("GFLOPs fwd+bwd", lambda a: f"{fmt_gflops(a['flops']['forward'])}+{fmt_gflops(a['flops']['backward'])}")
    row("FLOP-predicted", lambda a: fmt_speedup(a["speedup"]["flop_predicted"]))
    row("measured", lambda a: f"[bold]{fmt_speedup(a['speedup']['measured'])}[/]")
    row("vs plain", lambda a: fmt_speedup(a["speedup"].get("vs_plain")))
    row("step median", lambda a: fmt_seconds(a["timing"]["step_median_s"]))
    row("p10-p90 ms", lambda a: f"{fmt_ms(a['timing']['step_p10_s'])}-{fmt_ms(a['timing']['step_p90_s'])}")
    row("samples/s", lambda a: fmt_rate(a["timing"]["samples_per_s"]))
    row("peak memory", lambda a: fmt_bytes(a["memory"]["peak_bytes"]))
    row("optimizer state", lambda a: fmt_bytes(a["optimizer_state_bytes"]))
    row("loss 1st->last", lambda a: f"{a['loss']['first']:.3f}->{a['loss']['last']:.3f}")
    row("frozen intact", lambda a: ("[green]OK[/]" if a["freeze_integrity"]["ok"] else "[red]CHANGED[/]")
        + f" ({a['freeze_integrity']['tensors_checked']})")
    row("BN stats moved", lambda a: f"{a['frozen_batchnorm_drift']['layers_changed']} layers"
        if "frozen_batchnorm_drift" in a else "-")
    row("cache fill", lambda a: fmt_seconds(a["cache"]["cache_fill_s"]) if a.get("cache") else "-")
    kind = next(iter(arms.values()))["memory"]["kind"]
    table.caption = (f"speedups over full; vs plain: over the plain requires_grad=False loop; BN stats moved: "
                     f"frozen layers whose BatchNorm statistics changed; peak memory: {kind}" + _left_out(result))
    table.caption_justify = "left"
    return table


def depths_table(result: dict, groups: list[tuple[str | None, dict]]) -> Table:
    """One row per freeze point: plain vs freezetune vs freezetune + cache, as speedups over full.

    Narrow enough for an 80-column terminal; step times and everything else are in depths.json/.csv.

    Args:
        result: What ``compare.run.depths`` returned.
        groups: ``compare.run.by_depth(result["arms"])``: ``[(depth or None for full, {mode: arm}), ...]``.
    """
    table = Table(title=_title(result, "freeze depth sweep"), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col in ("frozen to", "trainable", "predicted", "plain", "freezetune", "+cache", "BN drift"):
        table.add_column(col, justify="left" if col == "frozen to" else "right", no_wrap=True)
    intact = True
    for depth, arms in groups:
        opt = arms.get("optimized") or arms.get("full")
        plain, cached = arms.get("plain"), arms.get("cached")
        drift = plain["frozen_batchnorm_drift"] if plain else None
        intact = intact and all(a["freeze_integrity"]["ok"] for a in arms.values())
        table.add_row(
            "full" if depth is None else f"{depth}{' (fc)' if opt['label'] == 'fc only' else ''}",
            share_text(opt["trainable_share"]), fmt_speedup(opt["speedup"]["flop_predicted"]),
            fmt_speedup(plain["speedup"]["measured"]) if plain else "-",
            f"[bold]{fmt_speedup(opt['speedup']['measured'])}[/]",
            f"[bold]{fmt_speedup(cached['speedup']['measured'])}[/]" if cached else "-",
            f"{drift['layers_changed']}/{drift['layers_checked']}" if drift else "-",
        )
    full = dict(groups)[None]["full"]["timing"]["step_median_s"]
    table.caption = (
        f"measured speedup over full ({fmt_seconds(full)}/step); predicted: FLOPs, uncached; BN drift: frozen "
        f"layers whose BatchNorm statistics the plain loop changed; frozen tensors "
        + ("[green]intact[/]" if intact else "[red]CHANGED[/]") + _left_out(result)
    )
    table.caption_justify = "left"
    return table


def headline(result: dict) -> list[str]:
    """The frozen-vs-full conclusion, one console markup line each: speedup, memory, integrity, files."""
    s, mem, integ = result["speedup"], result["memory_saved"], result["freeze_integrity"]
    frozen = result["arms"]["frozen"]["label"]
    lines = [f"[bold]{frozen}[/]: step [bold]{fmt_speedup(s['measured'])}[/] faster measured; "
             f"FLOPs predict {fmt_speedup(s['flop_predicted'])}"]
    if mem["bytes"] is not None:
        pct = f" ({fmt_percent(100 * mem['fraction'], 0)})" if mem["fraction"] is not None else ""
        kind = result["arms"]["frozen"]["memory"]["kind"]
        lines.append(f"peak memory saved: {fmt_bytes(mem['bytes'])}{pct} [dim]({kind})[/]")
    else:
        lines.append("peak memory: not measured (--no-memory)")
    if integ["ok"]:
        lines.append(f"freeze integrity: [green]OK[/] ({integ['tensors_checked']} frozen tensors, "
                     f"sha256 {integ['sha256_after'][:12]} before and after)")
    lines.append(files_line(result))
    return lines


def files_line(result: dict) -> str:
    """Where the comparison was written."""
    return f"files: {result['files']['json']}, .csv, .png"


def notice_line(result: dict) -> str | None:
    """The weights notice (random init...) as console markup, or None if there is none."""
    notice = result["weights"]["notice"]
    return f"[bold yellow]notice:[/] {escape(notice)}" if notice else None


def problems_line(problems: list[str]) -> str:
    """Why a comparison is not valid, as console markup."""
    return f"[bold red]error:[/] comparison is not valid: {', '.join(problems)}"


class ArmsProgress:
    """A progress bar over every arm's steps, advanced after each turn.

    Use as a context manager; it gives the ``report`` callback of ``compare.run``.
    """

    def __init__(self, console: Console, n_arms: int, steps_per_arm: int):
        self._bar = Progress(TextColumn("[bold]compare[/] {task.fields[arm]}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self._task = self._bar.add_task("compare", total=n_arms * steps_per_arm, arm="starting workers")

    def __enter__(self):
        self._bar.start()
        return self._advance

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def _advance(self, arm: str, phase: str, n: int, per_arm: int) -> None:
        if phase == "memory":
            self._bar.update(self._task, arm="memory pass: each arm a few steps in its own process")
        else:
            self._bar.update(self._task, advance=n, arm=f"{arm} ({phase})")
