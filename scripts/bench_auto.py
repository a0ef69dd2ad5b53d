"""What freeze.auto's gradient-norm meter costs per step: steps with and without it, interleaved.

One recipe (full fine-tuning, so every stage is measured), one fixed batch, and steps taken in
alternating order with the meter on and off, so drift in the machine hits both alike. Medians
after warm-up; the device is synchronized around every step (``train_step`` does it). The row
also has the median of each round's difference with a 95% interval, and the meter's call timed
alone (on CPU it returns when done; on a GPU it only queues its kernels, so read the steps).

    python scripts/bench_auto.py --config configs/quickstart.yaml --rounds 40
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from freezetune.config import load_config
from freezetune.training.recipe import Recipe
from freezetune.training.step import Batch, BatchSource, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the row (with the command) here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["freeze.trainable=null", "freeze.auto=true", "output.dir=runs/bench-auto",
                                    "output.overwrite=true", *args.overrides])
    recipe = Recipe(cfg).setup()
    engine = recipe.engine
    probe = engine.grad_probe
    assert probe is not None, "the meter is not attached"
    first = next(iter(recipe.training.batches(0)))
    batch = Batch(first.inputs, first.labels, None, BatchSource.IMAGES)
    times = {"with meter": [], "without meter": []}
    for i in range(args.warmup + args.rounds):
        order = [("with meter", probe), ("without meter", None)]
        for name, hook in order if i % 2 else reversed(order):
            engine.grad_probe = hook
            _, seconds = train_step(engine, batch, recipe.loss_fn)
            if i >= args.warmup:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each round's two steps ran back to back: their difference cancels the machine's drift, and
    # the median difference, with a distribution-free 95% interval, is the meter's end-to-end cost.
    diffs = sorted(a - b for a, b in zip(times["with meter"], times["without meter"], strict=True))
    low, high = median_interval(diffs)
    row = {"device": str(recipe.device), "threads": torch.get_num_threads(), "image_size": cfg.data.image_size,
           "batch_size": cfg.data.batch_size, "rounds": args.rounds,
           "median_ms_with_meter": round(med["with meter"] * 1e3, 2),
           "median_ms_without_meter": round(med["without meter"] * 1e3, 2),
           "overhead_pct": round(100 * (med["with meter"] / med["without meter"] - 1), 2),
           "paired_overhead_pct": round(100 * statistics.median(diffs) / med["without meter"], 2),
           "paired_overhead_pct_95": [round(100 * low / med["without meter"], 2),
                                      round(100 * high / med["without meter"], 2)],
           "meter_call_ms": round(time_meter(probe, args.rounds) * 1e3, 3)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps({**row, "torch": torch.__version__, "command": " ".join(sys.argv)}, indent=2) + "\n")
    recipe.cleanup()


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95% confidence interval for the median of sorted values, from binomial order statistics."""
    n = len(values)
    half = 1.96 * math.sqrt(n) / 2
    return values[max(0, math.floor(n / 2 - half))], values[min(n - 1, math.ceil(n / 2 + half))]


def time_meter(probe, rounds: int) -> float:
    """The meter's own call on the gradients the last step left: its median over ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        probe()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
