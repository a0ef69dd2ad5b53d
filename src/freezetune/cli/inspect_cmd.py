"""``freezetune inspect``: what the config's freeze plan does, without training."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from freezetune.cli.common import CONFIG_OPTION, DEBUG_OPTION, OVERRIDES_ARG, console, user_errors
from freezetune.config import load_config

MODULE_LEGEND = "train: requires_grad  BN: BatchNorm mode  bwd: reached by backward"
_STATE_STYLE = {"yes": "green", "no": "cyan", "partial": "yellow", "-": "dim"}


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("inspect")(inspect)


@user_errors
def inspect(
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = CONFIG_OPTION,
    depth: int = typer.Option(2, "--depth", min=1, help="Module levels to list (1: top-level only)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Show what freezing does to one training step, without training or downloading.

    Module tree: trainable, parameters, forward FLOPs, BatchNorm mode, reached by backward.

    One step, freeze plan vs all trainable: FLOPs, activations saved for backward, graph nodes.
    """
    from freezetune.inspection import inspect_config

    report = inspect_config(load_config(config, overrides or []), depth=depth)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    console.print(render(report.to_dict()))


def render(data: dict) -> RenderableType:
    """Renders an inspection (the dict from ``Inspection.to_dict``) for an 80-column terminal."""
    parts: list[RenderableType] = [header(data)]
    if data["weights_notice"]:
        parts.append(Panel(data["weights_notice"], title="NOTICE: random init", border_style="yellow"))
    parts += [Text(""), module_table(data), Text(MODULE_LEGEND, style="dim"), Text(""),
              step_table(data), Text(""), explanation(data)]
    return Group(*parts)


def header(data: dict) -> Text:
    """Model, input size, weights and the freeze spec in a few lines."""
    f = data["freeze"]
    given = [k for k in ("trainable", "frozen", "until") if f[k] is not None]
    spec = "freeze: nothing frozen"
    if given:
        value = f[given[0]]
        spec = f"freeze.{given[0]}: " + (f"[{', '.join(value)}]" if isinstance(value, list) else value)
    p = data["params"]
    return Text.from_markup(
        f"[bold]{data['model']}[/]  weights: {escape(data['weights_source'])}  "
        f"step: batch {data['batch_size']} x {_px(data)}\n"
        f"{escape(spec)}  batchnorm: {f['batchnorm']} "
        f"({f['frozen_batchnorm_layers']} BN layers in eval mode)\n"
        f"trainable params: {p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.1f}%)"
    )


def module_table(data: dict) -> Table:
    """The module tree down to the requested depth."""
    table = Table(
        title=f"Modules (depth {data['depth']}; FLOPs per image, forward)",
        title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1),
    )
    rows = data["modules"]
    name_width = max(len(_module_cells(r)[0]) for r in rows)
    table.add_column("module", no_wrap=True)
    # Deep trees have long names: the type column gives way so that 80 columns still fit.
    table.add_column("type", no_wrap=True, overflow="ellipsis", max_width=max(8, 80 - 40 - name_width))
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("train", justify="center", no_wrap=True)
    table.add_column("FLOPs", justify="right", no_wrap=True)
    table.add_column("BN", no_wrap=True)
    table.add_column("bwd", justify="center", no_wrap=True)
    for row in rows[1:]:
        table.add_row(*_module_cells(row))
    table.add_section()
    table.add_row(*_module_cells({**rows[0], "name": "total"}))
    return table


def _module_cells(row: dict) -> list[str]:
    indent = "  " * max(row["depth"] - 1, 0)
    state = row["trainable"]
    bwd = row["in_backward_graph"]
    return [
        indent + row["name"],
        row["kind"],
        compact(row["params"]),
        f"[{_STATE_STYLE[state]}]{state}[/]",
        compact(row["forward_flops"]) if row["forward_flops"] else "-",
        row["batchnorm"] or "-",
        "-" if bwd is None else "[green]yes[/]" if bwd else "[cyan]no[/]",
    ]


def step_table(data: dict) -> Table:
    """One training step under the freeze plan against the fully trainable model."""
    fl, gr, mem = data["step_flops"], data["graph"], data["activation_memory"]
    table = Table(
        title=f"One training step, batch {data['batch_size']} x {_px(data)}",
        title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1),
    )
    table.add_column("")
    table.add_column("frozen plan", justify="right")
    table.add_column("all trainable", justify="right")
    table.add_column("frozen/all", justify="right")
    rows = [
        ("forward FLOPs", fl["frozen"]["forward"], fl["full"]["forward"], fmt_flops),
        ("backward FLOPs", fl["frozen"]["backward"], fl["full"]["backward"], fmt_flops),
        ("total FLOPs", fl["frozen"]["total"], fl["full"]["total"], fmt_flops),
        ("saved activations", mem["frozen_bytes"], mem["full_bytes"], _fmt_bytes),
        ("autograd nodes", gr["frozen"]["nodes"], gr["full"]["nodes"], str),
        ("tensors getting .grad", gr["frozen"]["accumulate_grad"], gr["full"]["accumulate_grad"], str),
    ]
    for label, frozen, full, fmt in rows:
        table.add_row(label, fmt(frozen), fmt(full), fmt_pct(100 * frozen / full) if full else "-")
    table.add_row("frozen params in graph", str(gr["frozen"]["frozen_params_reached"]),
                  str(gr["full"]["frozen_params_reached"]), "")
    return table


def explanation(data: dict) -> Text:
    """The conclusions in words, with the numbers they rest on."""
    mem, fl = data["activation_memory"], data["step_flops"]
    outside = data["outside_backward_graph"]
    lines = [
        f"[bold]FLOP-predicted speedup:[/] {data['predicted_speedup']:.2f}x per step "
        f"(all-trainable FLOPs / frozen-plan FLOPs); backward skips "
        f"{fmt_flops(fl['full']['backward'] - fl['frozen']['backward'])}FLOPs. Real step time "
        "also pays for memory traffic, the optimizer and data loading: measure it with "
        "freezetune train.",
        f"[bold]Activation memory:[/] {_fmt_bytes(mem['frozen_bytes'])} instead of "
        f"{_fmt_bytes(mem['full_bytes'])}, {_fmt_bytes(mem['saved_bytes'])} "
        f"({fmt_pct(mem['saved_pct'])}) less. Counted: {escape(mem['what'])}.",
    ]
    if outside:
        lines.append(
            f"[bold]Outside the backward graph:[/] {', '.join(outside)}. Their outputs do not "
            "require grad, so autograd records no nodes and saves no tensors for them, and "
            "backward stops before reaching them."
        )
    else:
        lines.append("[bold]Every top-level module is in the backward graph:[/] the first "
                     "module's output requires grad, so backward runs all the way to the input.")
    passed = [r["name"] for r in data["modules"]
              if r["depth"] == 1 and r["trainable"] == "no" and r["in_backward_graph"]]
    if passed:
        lines.append(
            f"[bold]Frozen but still in the backward graph:[/] {', '.join(passed)}. A trainable "
            "layer comes before them, so backward must pass gradients through them; their own "
            "weights still get no .grad."
        )
    return Text.from_markup("\n".join(lines))


def _px(data: dict) -> str:
    return f"{data['image_size']}x{data['image_size']} px"


def fmt_flops(n: float) -> str:
    """Formats a FLOP count with an SI prefix: ``13.44 G``, ``296.1 M``."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}" if n / div < 100 else f"{n / div:.1f} {unit}"
    return f"{n:.0f} "


def compact(n: float) -> str:
    """Formats a count in at most five characters: ``11.2M``, ``296M``, ``9.41K``, ``128``."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def fmt_pct(p: float) -> str:
    """A percentage with one decimal that never rounds a nonzero share to 0 or a partial one to 100."""
    if 0 < p < 0.1:
        return "<0.1%"
    if 99.9 < p < 100:
        return ">99.9%"
    return f"{p:.1f}%"


def _fmt_bytes(n: float) -> str:
    from freezetune.render.console import fmt_bytes

    return fmt_bytes(n)
