"""Numbers and short texts for people: byte counts, durations, FLOPs, counts, percentages, speedups.

The one copy of every general-purpose formatter the tables, figures and command line use. Pure
functions of plain numbers: this module imports nothing from freezetune, so formatting a byte count
never pulls in torch or the training engine.
"""

from __future__ import annotations

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


# --------------------------------------------------------------------------------------------
# Sizes and durations


def fmt_bytes(n: float | None) -> str:
    """Formats a byte count with binary units, one decimal above bytes.

    Args:
        n: A byte count, or None when it was not measured.

    Returns:
        ``512 B``, ``1.5 KiB``, ``42.7 MiB``...; ``-`` for None.
    """
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def size_text(n: int) -> str:
    """Formats a byte count in the binary unit that keeps it readable, two decimals for GiB.

    Args:
        n: A byte count.

    Returns:
        ``512 B``, ``20.0 KiB``, ``42.7 MiB``, ``1.20 GiB``.
    """
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_seconds(s: float | None) -> str:
    """Formats a duration in ms below one second, else in seconds.

    Args:
        s: Seconds, or None when not measured.

    Returns:
        ``12.3 ms`` or ``1.50 s``; ``-`` for None.
    """
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_ms(s: float | None) -> str:
    """Formats a duration as a bare number of milliseconds, for columns whose header names the unit.

    Args:
        s: Seconds, or None when not measured.

    Returns:
        ``12.3``; ``-`` for None.
    """
    return "-" if s is None else f"{s * 1000:.1f}"


def fmt_lr(lr: float) -> str:
    """Formats a learning rate with three significant digits, as short as it reads.

    Args:
        lr: The learning rate.

    Returns:
        ``0.1``, ``0.003``, ``0.0001``, ``3e-05``.
    """
    return f"{lr:.3g}"


# --------------------------------------------------------------------------------------------
# Counts and FLOPs


def fmt_int(n: int) -> str:
    """Formats an exact count with thousands separators.

    Args:
        n: A count, e.g. of parameters.

    Returns:
        ``11,181,642``.
    """
    return f"{n:,}"


def fmt_flops(n: float) -> str:
    """Formats a FLOP count with an SI prefix and a trailing space for the unit.

    Args:
        n: FLOPs.

    Returns:
        ``13.44 G``, ``296.1 M``, ``512 `` (append ``FLOPs`` or nothing).
    """
    for div, unit in _SI:
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}" if n / div < 100 else f"{n / div:.1f} {unit}"
    return f"{n:.0f} "


def fmt_gflops(n: float) -> str:
    """Formats a FLOP count as a bare number of GFLOPs with two decimals.

    Args:
        n: FLOPs.

    Returns:
        ``3.64`` for 3.64e9.
    """
    return f"{n / 1e9:.2f}"


def compact(n: float) -> str:
    """Formats a count in at most five characters, three significant digits.

    Args:
        n: A count (parameters, FLOPs).

    Returns:
        ``11.2M``, ``296M``, ``9.41K``, ``128``.
    """
    for div, unit in _SI:
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def fmt_count(n: int) -> str:
    """Formats a count in millions with two decimals or thousands with one, as table cells do.

    Args:
        n: A count, e.g. of trainable parameters.

    Returns:
        ``11.18M``, ``5.1k``, ``42``.
    """
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def fmt_millions(n: int) -> str:
    """Formats a count in millions with one decimal.

    Args:
        n: A count, e.g. a model's parameters.

    Returns:
        ``11.7M``.
    """
    return f"{n / 1e6:.1f}M"


def fmt_rate(per_s: float | None) -> str:
    """Formats a throughput (samples per second) with one decimal.

    Args:
        per_s: Items per second; None or 0 when not measured.

    Returns:
        ``812.3``; ``-`` when missing.
    """
    return f"{per_s:.1f}" if per_s else "-"


# --------------------------------------------------------------------------------------------
# Shares and percentages


def fmt_percent(p: float, digits: int = 1) -> str:
    """Formats a percentage with a fixed number of decimals.

    Args:
        p: The percentage (``42.0`` for 42%).
        digits: Decimals to keep.

    Returns:
        ``42.0%`` (``42%`` with ``digits=0``).
    """
    return f"{p:.{digits}f}%"


def fmt_pct(p: float) -> str:
    """Formats a percentage with one decimal, never rounding a nonzero share to 0 or a partial one to 100.

    Args:
        p: The percentage (``42.0`` for 42%).

    Returns:
        ``42.0%``; ``<0.1%`` and ``>99.9%`` at the edges.
    """
    if 0 < p < 0.1:
        return "<0.1%"
    if 99.9 < p < 100:
        return ">99.9%"
    return f"{p:.1f}%"


def share_text(share: float) -> str:
    """Formats a share (0 to 1) as a percentage with enough digits to tell 0.02% from 0%.

    Args:
        share: A fraction, e.g. of parameters that train.

    Returns:
        ``100%``, ``0%``, ``75.1%``, ``0.05%``.
    """
    pct = 100 * share
    return f"{pct:.0f}%" if pct >= 99.95 or pct == 0 else f"{pct:.1f}%" if pct >= 1 else f"{pct:.2f}%"


# --------------------------------------------------------------------------------------------
# Speedups


def fmt_speedup(value: float | None) -> str:
    """Formats a speedup (a ratio) with two decimals and an ``x``.

    Args:
        value: The ratio, or None when it could not be computed.

    Returns:
        ``1.07x``, ``21.80x``; ``-`` for None.
    """
    return "-" if value is None else f"{value:.2f}x"


def fmt_speedup_short(value: float) -> str:
    """Formats a speedup with as many digits as are worth reading.

    Args:
        value: The ratio.

    Returns:
        ``1.07x``, ``21.8x``, ``10610x``.
    """
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


# --------------------------------------------------------------------------------------------
# Exact numbers (the autograd demo)


def num(x: float) -> str:
    """Formats a number as short as it can honestly be.

    Args:
        x: The number.

    Returns:
        ``36``, ``40.5``; never ``-0``.
    """
    return f"{x + 0.0:.6g}"


def vec(xs: list[float]) -> str:
    """Formats a list of numbers with :func:`num`.

    Args:
        xs: The numbers.

    Returns:
        ``[36, 81]``.
    """
    return "[" + ", ".join(num(x) for x in xs) + "]"


def mat(rows: list[list[float]]) -> str:
    """Formats a matrix, row by row, with :func:`vec`.

    Args:
        rows: The matrix as a list of rows.

    Returns:
        ``[[36, 0], [0, 81]]``.
    """
    return "[" + ", ".join(vec(r) for r in rows) + "]"
