"""Rich rendering of ``freezetune inspect``: the module tree and one training step, frozen vs not.

Everything here reads the plain dict of ``Inspection.to_dict()`` and fits an 80-column terminal.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from freezetune.render.format import compact, fmt_bytes, fmt_flops, fmt_int, fmt_pct, fmt_percent, fmt_speedup

MODULE_LEGEND = "train: requires_grad  BN: BatchNorm mode  bwd: reached by backward"
_STATE_STYLE = {"yes": "green", "no": "cyan", "partial": "yellow", "-": "dim"}


def render(data: dict) -> RenderableType:
    """Renders an inspection (the dict from ``Inspection.to_dict``) for an 80-column terminal."""
    parts: list[RenderableType] = [header(data)]
    if data["weights_notice"]:
        parts.append(Panel(data["weights_notice"], title="NOTICE: random init", border_style="yellow"))
    parts += [Text(""), module_table(data), Text(MODULE_LEGEND, style="dim"), Text(""),
              step_table(data), Text(""), explanation(data)]
    if data.get("execution"):
        parts += [Text(""), execution(data["execution"])]
    return Group(*parts)


# The execution choices worth a line in inspect (the rest follow train.* settings one to one).
EXECUTION_SHOWN = ("prefix_without_autograd", "fold_batchnorm", "feature_cache")


def execution(plan: dict) -> Table:
    """How ``freezetune train`` would run a step of this freeze state, each choice with its reason."""
    on = {"prefix_without_autograd": plan["prefix_without_autograd"], "fold_batchnorm": plan["folded_batchnorm"],
          "feature_cache": plan["feature_cache"]["enabled"]}
    table = Table(title="How freezetune train runs a step here", title_justify="left", box=None,
                  show_header=False, padding=(0, 1))
    for column in ("choice", "on", "why"):
        table.add_column(column, overflow="fold")
    for name in EXECUTION_SHOWN:
        table.add_row(name.replace("_", " "), "on" if on[name] else "off", plan["reasons"][name])
    return table


def header(data: dict) -> Text:
    """Model, input size, weights and the freeze spec in a few lines."""
    f = data["freeze"]
    given = [k for k in ("trainable", "frozen", "until") if f[k] is not None]
    spec = "freeze: nothing frozen"
    if given:
        value = f[given[0]]
        spec = f"freeze.{given[0]}: " + (f"[{', '.join(value)}]" if isinstance(value, list) else value)
    if f.get("adapt", "none") != "none":
        spec += f"  adapt.method: {f['adapt']}"
    p = data["params"]
    return Text.from_markup(
        f"[bold]{data['model']}[/]  weights: {escape(data['weights_source'])}  "
        f"step: batch {data['batch_size']} x {_px(data)}\n"
        f"{escape(spec)}  batchnorm: {f['batchnorm']} "
        f"({f['frozen_batchnorm_layers']} BN layers in eval mode)\n"
        f"trainable params: {fmt_int(p['trainable'])} of {fmt_int(p['total'])} "
        f"({fmt_percent(p['trainable_pct'])})"
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
        ("saved activations", mem["frozen_bytes"], mem["full_bytes"], fmt_bytes),
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
        f"[bold]FLOP-predicted speedup:[/] {fmt_speedup(data['predicted_speedup'])} per step "
        f"(all-trainable FLOPs / frozen-plan FLOPs); backward skips "
        f"{fmt_flops(fl['full']['backward'] - fl['frozen']['backward'])}FLOPs. Real step time "
        "also pays for memory traffic, the optimizer and data loading: measure it with "
        "freezetune train.",
        f"[bold]Activation memory:[/] {fmt_bytes(mem['frozen_bytes'])} instead of "
        f"{fmt_bytes(mem['full_bytes'])}, {fmt_bytes(mem['saved_bytes'])} "
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
