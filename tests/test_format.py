"""Every formatter in freezetune.render.format: inputs and the exact text tables and logs show."""

import subprocess
import sys

import pytest

from freezetune.render import format as f

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

CASES = [
    # fmt_lr: three significant digits, as short as they read.
    (f.fmt_lr, (0.1,), "0.1"),
    (f.fmt_lr, (0.003,), "0.003"),
    (f.fmt_lr, (0.030000000000000002,), "0.03"),
    (f.fmt_lr, (3e-05,), "3e-05"),
    # fmt_bytes: binary units, whole bytes, one decimal above; signs kept; TiB is the largest unit.
    (f.fmt_bytes, (None,), "-"),
    (f.fmt_bytes, (0,), "0 B"),
    (f.fmt_bytes, (512,), "512 B"),
    (f.fmt_bytes, (1023,), "1023 B"),
    (f.fmt_bytes, (1024,), "1.0 KiB"),
    (f.fmt_bytes, (1536,), "1.5 KiB"),
    (f.fmt_bytes, (42.7 * MiB,), "42.7 MiB"),
    (f.fmt_bytes, (3 * GiB,), "3.0 GiB"),
    (f.fmt_bytes, (2.5 * TiB,), "2.5 TiB"),
    (f.fmt_bytes, (5 * 1024 * TiB,), "5120.0 TiB"),
    (f.fmt_bytes, (-512,), "-512 B"),
    (f.fmt_bytes, (-2048,), "-2.0 KiB"),
    # size_text: like fmt_bytes but GiB is the largest unit and gets two decimals.
    (f.size_text, (0,), "0 B"),
    (f.size_text, (512,), "512 B"),
    (f.size_text, (1023,), "1023 B"),
    (f.size_text, (1024,), "1.0 KiB"),
    (f.size_text, (20 * KiB,), "20.0 KiB"),
    (f.size_text, (int(42.7 * MiB),), "42.7 MiB"),
    (f.size_text, (int(1.2 * GiB),), "1.20 GiB"),
    (f.size_text, (5 * TiB,), "5120.00 GiB"),
    # fmt_seconds: ms below one second, seconds from one on.
    (f.fmt_seconds, (None,), "-"),
    (f.fmt_seconds, (0,), "0.0 ms"),
    (f.fmt_seconds, (0.0123,), "12.3 ms"),
    (f.fmt_seconds, (0.00004,), "0.0 ms"),
    (f.fmt_seconds, (0.999,), "999.0 ms"),
    (f.fmt_seconds, (1,), "1.00 s"),
    (f.fmt_seconds, (1.5,), "1.50 s"),
    (f.fmt_seconds, (86400,), "86400.00 s"),
    # fmt_ms: a bare number of milliseconds.
    (f.fmt_ms, (None,), "-"),
    (f.fmt_ms, (0,), "0.0"),
    (f.fmt_ms, (0.0123,), "12.3"),
    (f.fmt_ms, (2,), "2000.0"),
    (f.fmt_ms, (-0.001,), "-1.0"),
    # fmt_int: exact, with thousands separators.
    (f.fmt_int, (0,), "0"),
    (f.fmt_int, (999,), "999"),
    (f.fmt_int, (1000,), "1,000"),
    (f.fmt_int, (11_181_642,), "11,181,642"),
    (f.fmt_int, (-1234,), "-1,234"),
    (f.fmt_int, (10**15,), "1,000,000,000,000,000"),
    # fmt_flops: SI prefix, two decimals below 100 of the unit, one from 100 on; a trailing space.
    (f.fmt_flops, (0,), "0 "),
    (f.fmt_flops, (512,), "512 "),
    (f.fmt_flops, (999,), "999 "),
    (f.fmt_flops, (1e3,), "1.00 K"),
    (f.fmt_flops, (296.1e6,), "296.1 M"),
    (f.fmt_flops, (13.44e9,), "13.44 G"),
    (f.fmt_flops, (1.5e12,), "1.50 T"),
    (f.fmt_flops, (1e15,), "1000.0 T"),
    (f.fmt_flops, (-5e9,), "-5.00 G"),
    # fmt_gflops: bare GFLOPs, two decimals.
    (f.fmt_gflops, (3.64e9,), "3.64"),
    (f.fmt_gflops, (0,), "0.00"),
    (f.fmt_gflops, (4e6,), "0.00"),
    (f.fmt_gflops, (1e12,), "1000.00"),
    # compact: three significant digits and an SI letter.
    (f.compact, (0,), "0"),
    (f.compact, (128,), "128"),
    (f.compact, (999,), "999"),
    (f.compact, (1000,), "1K"),
    (f.compact, (1500,), "1.5K"),
    (f.compact, (9410,), "9.41K"),
    (f.compact, (296e6,), "296M"),
    (f.compact, (11_181_642,), "11.2M"),
    (f.compact, (3.64e9,), "3.64G"),
    (f.compact, (2e12,), "2T"),
    (f.compact, (-2500,), "-2.5K"),
    # fmt_count: millions with two decimals, thousands with one, else the plain integer.
    (f.fmt_count, (0,), "0"),
    (f.fmt_count, (42,), "42"),
    (f.fmt_count, (999,), "999"),
    (f.fmt_count, (1000,), "1.0k"),
    (f.fmt_count, (5130,), "5.1k"),
    (f.fmt_count, (11_181_642,), "11.18M"),
    (f.fmt_count, (10**12,), "1000000.00M"),
    # fmt_millions: one decimal of millions, whatever the size.
    (f.fmt_millions, (0,), "0.0M"),
    (f.fmt_millions, (11_689_512,), "11.7M"),
    (f.fmt_millions, (5130,), "0.0M"),
    (f.fmt_millions, (10**10,), "10000.0M"),
    # fmt_rate: one decimal; None and 0 mean "not measured".
    (f.fmt_rate, (None,), "-"),
    (f.fmt_rate, (0,), "-"),
    (f.fmt_rate, (0.0,), "-"),
    (f.fmt_rate, (812.34,), "812.3"),
    (f.fmt_rate, (0.04,), "0.0"),
    (f.fmt_rate, (1e7,), "10000000.0"),
    # fmt_percent: fixed decimals.
    (f.fmt_percent, (42,), "42.0%"),
    (f.fmt_percent, (42, 0), "42%"),
    (f.fmt_percent, (42.125, 2), "42.12%"),
    (f.fmt_percent, (0,), "0.0%"),
    (f.fmt_percent, (-5,), "-5.0%"),
    (f.fmt_percent, (250,), "250.0%"),
    # fmt_pct: one decimal, but never rounds a nonzero share to 0 or a partial one to 100.
    (f.fmt_pct, (0,), "0.0%"),
    (f.fmt_pct, (0.0001,), "<0.1%"),
    (f.fmt_pct, (0.05,), "<0.1%"),
    (f.fmt_pct, (0.1,), "0.1%"),
    (f.fmt_pct, (42,), "42.0%"),
    (f.fmt_pct, (99.9,), "99.9%"),
    (f.fmt_pct, (99.96,), ">99.9%"),
    (f.fmt_pct, (99.9999,), ">99.9%"),
    (f.fmt_pct, (100,), "100.0%"),
    (f.fmt_pct, (150,), "150.0%"),
    (f.fmt_pct, (-5,), "-5.0%"),
    # share_text: a fraction as a percentage, with more digits the smaller it is.
    (f.share_text, (1,), "100%"),
    (f.share_text, (0,), "0%"),
    (f.share_text, (0.99951,), "100%"),
    (f.share_text, (0.9994,), "99.9%"),
    (f.share_text, (0.751129,), "75.1%"),
    (f.share_text, (0.01,), "1.0%"),
    (f.share_text, (0.0099,), "0.99%"),
    (f.share_text, (0.0005,), "0.05%"),
    (f.share_text, (0.0002,), "0.02%"),
    # fmt_speedup: two decimals and an x.
    (f.fmt_speedup, (None,), "-"),
    (f.fmt_speedup, (0,), "0.00x"),
    (f.fmt_speedup, (1.07,), "1.07x"),
    (f.fmt_speedup, (21.8,), "21.80x"),
    (f.fmt_speedup, (10610,), "10610.00x"),
    # fmt_speedup_short: fewer decimals as the ratio grows.
    (f.fmt_speedup_short, (0.5,), "0.50x"),
    (f.fmt_speedup_short, (1.07,), "1.07x"),
    (f.fmt_speedup_short, (10,), "10.0x"),
    (f.fmt_speedup_short, (21.8,), "21.8x"),
    (f.fmt_speedup_short, (100,), "100x"),
    (f.fmt_speedup_short, (10610.4,), "10610x"),
    # num: as short as honest, never "-0".
    (f.num, (36,), "36"),
    (f.num, (36.0,), "36"),
    (f.num, (40.5,), "40.5"),
    (f.num, (0,), "0"),
    (f.num, (-0.0,), "0"),
    (f.num, (-2.5,), "-2.5"),
    (f.num, (1 / 3,), "0.333333"),
    (f.num, (1234567,), "1.23457e+06"),
    (f.num, (1e20,), "1e+20"),
    (f.num, (1e-7,), "1e-07"),
    (f.vec, ([36, 81],), "[36, 81]"),
    (f.vec, ([],), "[]"),
    (f.vec, ([-0.0, 0.5],), "[0, 0.5]"),
    (f.mat, ([[36, 0], [0, 81]],), "[[36, 0], [0, 81]]"),
    (f.mat, ([],), "[]"),
    (f.mat, ([[]],), "[[]]"),
    (f.mat, ([[-0.0]],), "[[0]]"),
]


@pytest.mark.parametrize("fn,args,expected", CASES,
                         ids=[f"{fn.__name__}{args!r}" for fn, args, _ in CASES])
def test_formatter(fn, args, expected):
    assert fn(*args) == expected


def test_every_formatter_has_cases():
    public = {name for name, obj in vars(f).items()
              if callable(obj) and not name.startswith("_") and getattr(obj, "__module__", None) == f.__name__}
    assert public == {fn.__name__ for fn, _, _ in CASES}


def test_compact_fits_five_characters_across_the_range():
    # Table columns are sized for it: check values from 1 to about 10^13, three significant digits each.
    for exp in range(13):
        for mantissa in (1, 1.5, 2.34, 5, 9.41):
            text = f.compact(mantissa * 10**exp)
            assert len(text) <= 5, (mantissa * 10**exp, text)


def test_unmeasured_values_all_read_as_a_dash():
    for fn in (f.fmt_bytes, f.fmt_seconds, f.fmt_ms, f.fmt_rate, f.fmt_speedup):
        assert fn(None) == "-", fn.__name__


def test_formatting_imports_neither_torch_nor_the_rest_of_freezetune():
    code = ("import sys, freezetune.render.format; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'freezetune')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['freezetune', 'freezetune.render', 'freezetune.render.format']"
