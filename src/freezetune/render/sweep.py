"""Rich rendering of ``freezetune sweep``: the arms' table, the recommendation, epoch progress.

Everything reads the plain ``sweep.json`` record (see :mod:`freezetune.sweep.result`); the keys
of the learning-rate grid, which older records lack, are read with ``.get`` and left out when absent.

The arms' table fits the console it is printed to. A pipe or a log file (CI, SLURM, ``| tee``)
gets 80 columns, where the full table does not fit and rich would squeeze its numbers out. So
the widest layout that fits is chosen at print time (:data:`LAYOUTS`): the full table; the full
table with each sd under its mean; the essential columns (accuracy, rate, time to target,
training time), inline and then stacked; and, narrower still, one block per arm.
"""

from __future__ import annotations

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from freezetune.render.format import fmt_bytes, fmt_gflops, fmt_lr, fmt_ms, fmt_percent, fmt_seconds

_NATURAL = 10_000  # a console width no layout needs: tables are measured at it, then compared to the real one


# --------------------------------------------------------------------------------------------
# Cells: one figure of one arm, inline (``0.693 ± 0.012``) or stacked (the sd on a line under the mean)


def _sep(stacked: bool) -> str:
    return "\n" if stacked else " "


def _pm(stat: dict, fmt, stacked: bool = False, sd_fmt=None) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt(stat["mean"])
    if stat["sd"] is not None:
        text += f"{_sep(stacked)}± {(sd_fmt or fmt)(stat['sd'])}"
    return text


def _seconds(stat: dict, stacked: bool = False) -> str:
    """``12.30 s ± 0.42 s``: a duration's mean ± sd, the sd in the mean's unit."""
    if stat["mean"] is not None and stat["mean"] >= 1:
        return _pm(stat, fmt_seconds, stacked, lambda s: f"{s:.2f} s")
    return _pm(stat, fmt_seconds, stacked, lambda s: f"{s * 1000:.1f} ms")


def _acc(x: float) -> str:
    return f"{x:.3f}"


def _mult(m: float) -> str:
    return f"{m:g}x"


def _lr_cell(arm: dict, result: dict, stacked: bool) -> str:
    if arm.get("lr") is None:
        return "-"
    mult = arm.get("lr_multiplier")
    return fmt_lr(arm["lr"]) + ("" if mult is None else f"{_sep(stacked)}({_mult(mult)})")


def _reached(arm: dict) -> int:
    """How many of the arm's seeds reached the target (counted from its seeds in records without the key)."""
    if arm.get("target_reached") is not None:
        return arm["target_reached"]
    return sum(s.get("time_to_target_s") is not None for s in arm.get("seeds", []))


def _target_cell(arm: dict, result: dict, stacked: bool) -> str:
    """The time to target; ``(2/3)`` after it when only some seeds reached it, ``never`` when none did."""
    if result["target_accuracy"] is None:
        return "-"
    seeds, reached = len(result["seeds"]), _reached(arm)
    if reached == 0 and arm["time_to_target_s"]["mean"] is None:
        return "never"
    text = _seconds(arm["time_to_target_s"], stacked)
    return text if reached >= seeds else f"{text}{_sep(stacked)}({reached}/{seeds})"


_CELLS = {  # header: cell(arm, result, stacked), in the full table's order
    "trainable": lambda arm, result, stacked: fmt_percent(arm["trainable_pct"]),
    "val acc": lambda arm, result, stacked: _pm(arm["val_accuracy"], _acc, stacked),
    "best": lambda arm, result, stacked: _pm(arm["best_val_accuracy"], _acc, stacked),
    "lr": _lr_cell,
    "to target": _target_cell,
    "train": lambda arm, result, stacked: _seconds(arm["wall_s"], stacked),
    "val": lambda arm, result, stacked: _seconds(arm["val_s"], stacked),
    "step": lambda arm, result, stacked: fmt_ms(arm["step_s"]["mean"]),
    "GFLOPs": lambda arm, result, stacked: "-" if arm["flops_per_step"] is None else fmt_gflops(arm["flops_per_step"]),
    "peak mem": lambda arm, result, stacked: fmt_bytes(arm["peak_memory_bytes"]),
}
FULL_COLUMNS = tuple(_CELLS)
ESSENTIAL_COLUMNS = ("val acc", "lr", "to target", "train")
# Widest first, each (columns, stacked); where none fits, one block per arm.
LAYOUTS = ((FULL_COLUMNS, False), (FULL_COLUMNS, True), (ESSENTIAL_COLUMNS, False), (ESSENTIAL_COLUMNS, True))


def _label(name: str, arm: dict, pick: str | None, with_label: bool = True) -> str:
    label = escape(name)
    if with_label and name != arm["label"]:
        label += f" [dim]({escape(arm['label'])})[/]"
    return f"[bold]{label}[/]" if name == pick else label


def _notes(name: str, arm: dict, pick: str | None, with_label: bool = False) -> str:
    label = f"[dim]{escape(arm['label'])}[/]" if with_label and name != arm["label"] else ""
    marks = []
    if name == pick:
        marks.append("[bold green]recommended[/]")
    if arm["on_pareto"]:
        marks.append("pareto")
    if arm.get("on_memory_pareto"):
        marks.append("memory pareto")
    if arm["status"] == "pruned":
        marks.append(f"[yellow]pruned after epoch {arm['pruned_at_epoch']}[/]")
    elif arm["status"] != "completed":
        marks.append(f"[red]{escape(arm['status'])}[/]")
    if arm.get("lr_edge"):
        marks.append(f"[yellow]lr at grid edge ({escape(arm['lr_edge'])}): widen --lr-grid[/]")
    return "; ".join(part for part in (label, ", ".join(marks)) if part)


# --------------------------------------------------------------------------------------------
# The rates each arm tried


def _rate_items(arm: dict) -> list[str]:
    """``0.1x .48``, one per rate the arm tried: ``*`` marks its chosen rate, ``p`` one pruned early."""
    items = []
    for rate in arm.get("lr_grid") or []:
        acc = rate["val_accuracy"]["mean"]
        text = f"{_mult(rate['multiplier'])} {'-' if acc is None else f'{acc:.2f}'.removeprefix('0')}"
        if rate["multiplier"] == arm.get("lr_multiplier"):
            text += "*"
        if rate["status"] == "pruned":
            text += "p"
        elif rate["status"] != "completed":
            text += f" {rate['status']}"
        items.append(text)
    return items


def _has_rates(result: dict) -> bool:
    """Whether any arm tried more than one rate (a one-rate grid has nothing to compare)."""
    return any(len(arm.get("lr_grid") or []) > 1 for arm in result["arms"].values())


class _Flow:
    """Short texts in a row, ``sep`` between them, going on to more lines where the width ends; none is split."""

    def __init__(self, parts: list[str], sep: str = "   "):
        self.parts, self.sep = parts, sep

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(max(map(cell_len, self.parts), default=0), cell_len(self.sep.join(self.parts)))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = [""]
        for part in self.parts:
            joined = f"{lines[-1]}{self.sep}{part}" if lines[-1] else part
            if lines[-1] and cell_len(joined.rstrip()) > options.max_width:
                lines[-1] = lines[-1].rstrip()
                lines.append(part)
            else:
                lines[-1] = joined
        yield Text("\n".join(lines))


def rates_table(result: dict) -> Group:
    """Per arm, the final validation accuracy at each rate it tried: the summary under the arms' table.

    Args:
        result: A ``sweep.json`` record with the ``lr_grid`` of each arm.

    Returns:
        A line saying what the figures are, then one row per arm.
    """
    table = Table.grid(padding=(0, 2, 0, 0))
    table.add_column(no_wrap=True)
    table.add_column()
    for name, arm in result["arms"].items():
        table.add_row(escape(name), _Flow(_rate_items(arm), " | "))
    return Group(Text("rates tried: final val acc at each (* the arm's rate, p pruned early)", style="dim"), table)


# --------------------------------------------------------------------------------------------
# Layouts


class SweepTable:
    """The arms' figures in the widest layout that fits the console, then the notes that go under it.

    A rich renderable: the layout is chosen when it is printed, from the width it is given.
    """

    def __init__(self, result: dict):
        self.result = result

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Yields the layout that fits ``options.max_width``, the rates tried, then the lines under them."""
        layout = fitting_layout(self.result, console, options)
        yield layout
        if isinstance(layout, Table) and _has_rates(self.result):
            yield rates_table(self.result)
        for line in footer_lines(self.result):
            yield Text.from_markup(line)


def sweep_table(result: dict) -> SweepTable:
    """One row per arm: accuracy (final, best), rate, time to target, training and validation time, cost.

    Args:
        result: A ``sweep.json`` record.

    Returns:
        A renderable that prints the full table on a wide console and keeps every arm's accuracy,
        learning rate, time to target and training time on a narrow one (80 columns, a pipe).
    """
    return SweepTable(result)


def fitting_layout(result: dict, console: Console, options: ConsoleOptions) -> RenderableType:
    """The table of the first of :data:`LAYOUTS` that fits ``options.max_width``, else one block per arm.

    A table fits if its figures fit unwrapped and its notes, the one column that wraps, keep their
    longest word whole.
    """
    natural = options.update_width(_NATURAL)
    for names, stacked in LAYOUTS:
        table = arms_table(result, names, stacked)
        if Measurement.get(console, natural, table).minimum <= options.max_width:
            return table
    return arm_blocks(result)


def _present(result: dict, names: tuple) -> list[str]:
    """The columns of ``names`` the record has figures for (no lr column for records without rates)."""
    has_lr = any(arm.get("lr") is not None for arm in result["arms"].values())
    return [name for name in names if name != "lr" or has_lr]


def arms_table(result: dict, names: tuple = FULL_COLUMNS, stacked: bool = False) -> Table:
    """A table of the arms with the given figure columns between the arm and its notes.

    Args:
        result: A ``sweep.json`` record.
        names: Figure columns, keys of the cell table, in order; those the record lacks are left out.
            Without the full set, each arm's label moves from the arm column to its notes.
        stacked: Whether each sd goes on a line under its mean (rows then get a line between them).

    Returns:
        The table; only its notes column wraps.
    """
    columns = _present(result, names)
    full = tuple(names) == FULL_COLUMNS
    pick = result["recommendation"]["arm"]
    rows = [[_label(name, arm, pick, full), *(_CELLS[c](arm, result, stacked) for c in columns),
             _notes(name, arm, pick, not full)] for name, arm in result["arms"].items()]
    table = Table(title=_title(result), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  show_lines=stacked)
    headers = ["arm", *columns, ""]
    for i, header in enumerate(headers):
        whole = i < len(headers) - 1  # all but the notes: measured at their widest line, as they are printed
        table.add_column(header, justify="right" if header in _CELLS else "left", no_wrap=whole,
                         min_width=_widest([header, *(row[i] for row in rows)]) if whole else None)
    for row in rows:
        table.add_row(*row)
    return table


def _widest(cells: list[str]) -> int:
    """The width of the widest line of these console-markup cells."""
    return max(cell_len(line) for cell in cells for line in Text.from_markup(cell).plain.split("\n"))


def _title(result: dict) -> str:
    d = result["data"]
    seeds = len(result["seeds"])
    target = result["target_accuracy"]
    return (f"{result['model']} sweep | {result['device']} | {d['image_size']}px, batch {d['batch_size']} | "
            f"{result['epochs']} epochs x {seeds} seed{'s' if seeds > 1 else ''} | target "
            f"{'-' if target is None else f'{target:.3f}'}")


def arm_blocks(result: dict) -> Group:
    """One block per arm, its figures under its name: the layout for consoles too narrow for any table.

    Args:
        result: A ``sweep.json`` record.

    Returns:
        The title, then per arm its name and notes and its figures indented under them.
    """
    pick = result["recommendation"]["arm"]
    parts: list[RenderableType] = [Text(_title(result))]
    for name, arm in result["arms"].items():
        notes = _notes(name, arm, pick)
        head = Text.from_markup(_label(name, arm, pick) + (f": {notes}" if notes else ""))
        grid = Table.grid(padding=(0, 2, 0, 0))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for key, figures in _block_rows(arm, result):
            grid.add_row(key, figures)
        parts += [Text(""), head, Padding(grid, (0, 0, 0, 2))]
    return Group(*parts, Text(""))


def _block_rows(arm: dict, result: dict) -> list[tuple[str, _Flow]]:
    """A block's figures by row; a row's parts go side by side where they fit, one under another where not."""
    def cell(name: str) -> str:
        return _CELLS[name](arm, result, False)

    rows = [("val acc", _Flow([cell("val acc"), f"best {cell('best')}"]))]
    if arm.get("lr") is not None:
        rows.append(("lr", _Flow([cell("lr")])))
    if len(arm.get("lr_grid") or []) > 1:
        rows.append(("rates", _Flow(_rate_items(arm), " | ")))
    rows += [("to target", _Flow([cell("to target")])), ("train", _Flow([cell("train"), f"val {cell('val')}"])),
             ("cost", _Flow([f"step {fmt_seconds(arm['step_s']['mean'])}", f"GFLOPs {cell('GFLOPs')}",
                             f"peak mem {cell('peak mem')}", f"trainable {cell('trainable')}"]))]
    return rows


def footer_lines(result: dict) -> list[str]:
    """The lines under the arms' figures: the learning-rate grid and how each arm's rate was chosen.

    Args:
        result: A ``sweep.json`` record; one that tried a single rate gives no lines.

    Returns:
        Console-markup lines.
    """
    grid, base = result.get("lr_grid") or [], result.get("base_lr")
    if len(grid) < 2 and not _has_rates(result):
        return []
    lines = []
    if len(grid) > 1:
        of = "" if base is None else f" of the config's lr {fmt_lr(base)}"
        lines.append(f"[dim]lr grid: {', '.join(_mult(m) for m in grid)}{of}[/]")
    if result.get("selection"):
        lines.append(f"[dim]{escape(result['selection'])}[/]")
    return lines


# --------------------------------------------------------------------------------------------
# The recommendation and progress


def _at_rate(lr: float | None, multiplier: float | None) -> str:
    if lr is None:
        return ""
    return f" at lr {fmt_lr(lr)}" + ("" if multiplier is None else f" ({_mult(multiplier)})")


def recommendation_lines(result: dict) -> list[str]:
    """The recommendation (the arm, and its rate where the record has one), the legend and where the files are.

    Args:
        result: A ``sweep.json`` record.

    Returns:
        Console-markup lines.
    """
    rec = result["recommendation"]
    lines = []
    if rec["arm"] is None:
        lines.append(f"[bold yellow]no recommendation:[/] {escape(rec['reason'])}")
    else:
        arm = result["arms"].get(rec["arm"], {})
        rate = _at_rate(rec.get("lr", arm.get("lr")), rec.get("lr_multiplier", arm.get("lr_multiplier")))
        lines.append(f"[bold green]recommendation: {escape(rec['arm'])}{rate}[/]. {escape(rec['reason'])}")
    if result["target_accuracy"] is not None:
        lines.append(f"[dim]train = training time (waits for data and cache filling included; validation, logging "
                     "and checkpoints apart); to target = "
                     f"time until validation accuracy first reached {result['target_accuracy']:.3f} "
                     f"({result['target_source']}), over the seeds that reached it (k/n when not all did)[/]")
    files = result["files"]
    lines.append(f"wrote {files['json']}, {files['csv']} and {files['png']}")
    return lines


def epoch_line(arm: str, seed: int, record, epochs: int) -> str:
    """One progress line per (arm, seed, epoch)."""
    acc = "-" if record.val_accuracy is None else f"{record.val_accuracy:.3f}"
    cached = " [dim]cached[/]" if record.cached else ""
    return (f"epoch {record.epoch + 1}/{epochs}  {escape(arm):<10} seed {seed}  val acc {acc}  "
            f"train {fmt_seconds(record.train_s)}{cached}")
