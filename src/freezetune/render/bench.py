"""What ``freezetune bench`` prints besides the markdown table: progress per cell and the CI gate verdict.

The table itself is :func:`freezetune.compare.bench.markdown_table`, the same text the ``.md`` file holds.
"""

from __future__ import annotations

from freezetune.render.format import fmt_speedup


def cell_line(cell: dict, arm: str) -> str:
    """One line as soon as a cell is measured: the ``arm`` (fc only) speedups, measured and predicted."""
    a = cell["arms"].get(arm, {})
    return (f"measured {cell['image_size']}px batch {cell['batch_size']}: fc-only "
            f"{fmt_speedup(a.get('speedup_measured') or 0)} measured, "
            f"{fmt_speedup(a.get('speedup_flop_predicted') or 0)} FLOP-predicted")


def wrote_line(json_path, md_path, wall_s: float) -> str:
    """Where the benchmark was written, and how long it took."""
    return f"wrote {json_path} and {md_path} ({wall_s:.0f} s)"


def gate_failed_lines(failures: list[str]) -> list[str]:
    """One line per failure of the CI gate."""
    return [f"BENCH GATE FAILED: {line}" for line in failures]


def gate_passed_line(min_speedup: float, min_fraction: float, min_vs_plain: float, max_loss_diff: float) -> str:
    """What the CI gate checked, once it passed.

    Args:
        min_speedup: Least fc-only measured speedup over full.
        min_fraction: Least fraction of the FLOP-predicted speedup that must be measured.
        min_vs_plain: Least speedup of freezetune's path over the plain loop at any depth.
        max_loss_diff: Largest per-step loss difference between cached and uncached arms.
    """
    return (f"bench gate passed: fc-only measured speedup >= {min_speedup}x and >= "
            f"{min_fraction} x FLOP-predicted on CPU; freezetune's path at least as fast "
            f"as the plain loop (geometric mean over depths; no depth below {min_vs_plain}x); "
            f"cached losses within {max_loss_diff:g} of uncached; frozen tensors unchanged")
