#!/usr/bin/env python
"""Benchmark what freezing buys on this device: the depth sweep over image and batch sizes.

    python scripts/bench.py                      # full matrix -> benchmarks/<device>-torch<version>.{json,md}
    python scripts/bench.py --sizes 64 --batch-sizes 8 --steps 5
    python scripts/bench.py --ci                 # small matrix; exit 1 if fc-only freezing does not pay

The work is done by freezetune.compare.bench; this script only parses options and prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from freezetune.compare import bench
from freezetune.errors import FreezetuneError

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ci", action="store_true",
                   help=f"CI mode: sizes {bench.CI_SIZES}, batch sizes {bench.CI_BATCH_SIZES}, "
                   f"{bench.CI_STEPS} steps; exit 1 if on CPU the fc-only measured speedup is below "
                   f"{bench.MIN_SPEEDUP}x or below {bench.MIN_FRACTION_OF_PREDICTED} x the FLOP-predicted "
                   "one or freezetune's path is slower than the plain loop (geometric mean over depths, or "
                   f"any depth below {bench.MIN_VS_PLAIN}x), or if "
                   "cached losses leave the uncached ones or any frozen tensor changed")
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes [default: 64 224]")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes [default: 8 32]")
    p.add_argument("--steps", type=int, help=f"timed steps per arm [default: {bench.DEFAULT_STEPS}]")
    p.add_argument("--warmup", type=int, help=f"warm-up steps per arm [default: {bench.DEFAULT_WARMUP}]")
    p.add_argument("--depths", nargs="+", default=list(bench.DEPTHS), metavar="STAGE",
                   help="freeze points to sweep besides full [default: all: stem layer1 layer2 layer3 layer4]")
    p.add_argument("--modes", nargs="+", default=list(bench.MODES), metavar="MODE",
                   help="how each freeze point runs [default: all: plain optimized cached]")
    p.add_argument("--block", type=int, help="steps per turn when arms take turns")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [default: auto]")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory pass (each arm in its own process); implied by --ci")
    p.add_argument("--out", type=Path,
                   help="output folder [default: benchmarks/, or runs/bench-ci/ with --ci]")
    args = p.parse_args(argv)
    ci = args.ci
    args.sizes = tuple(args.sizes or (bench.CI_SIZES if ci else bench.DEFAULT_SIZES))
    args.batch_sizes = tuple(args.batch_sizes or (bench.CI_BATCH_SIZES if ci else bench.DEFAULT_BATCH_SIZES))
    args.steps = args.steps or (bench.CI_STEPS if ci else bench.DEFAULT_STEPS)
    args.warmup = args.warmup if args.warmup is not None else (bench.CI_WARMUP if ci else bench.DEFAULT_WARMUP)
    args.out = args.out or REPO / ("runs/bench-ci" if ci else "benchmarks")
    for name in ("sizes", "batch_sizes"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python scripts/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def on_cell(cell: dict) -> None:
        fc = cell["arms"].get(bench.GATE_ARM, {})
        print(f"measured {cell['image_size']}px batch {cell['batch_size']}: fc-only "
              f"{fc.get('speedup_measured') or 0:.2f}x measured, "
              f"{fc.get('speedup_flop_predicted') or 0:.2f}x FLOP-predicted", file=sys.stderr, flush=True)

    try:
        result = bench.run_bench(args.sizes, args.batch_sizes, args.steps, args.warmup, args.device,
                                 args.block, not (args.no_memory or args.ci), on_cell, tuple(args.depths),
                                 tuple(args.modes))
    except FreezetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = bench.write_bench(result, args.out, command.strip())
    print(bench.markdown_table(result))
    print(f"wrote {json_path} and {md_path} ({result['wall_s']:.0f} s)")
    if args.ci:
        failures = bench.gate(result)
        for line in failures:
            print(f"BENCH GATE FAILED: {line}", file=sys.stderr)
        if failures:
            return 1
        print(f"bench gate passed: fc-only measured speedup >= {bench.MIN_SPEEDUP}x and >= "
              f"{bench.MIN_FRACTION_OF_PREDICTED} x FLOP-predicted on CPU; freezetune's path at least as fast "
              f"as the plain loop (geometric mean over depths; no depth below {bench.MIN_VS_PLAIN}x); "
              "cached losses within "
              f"{bench.MAX_CACHED_LOSS_DIFF:g} of uncached; frozen tensors unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
