"""Times `freezetune sweep` against separate `freezetune train` runs, as whole processes.

    .venv/bin/python scripts/bench_sweep.py --out runs/bench-sweep [key=value ...]

Runs, one after another on this machine, each as its own process:

1. ``freezetune sweep --prune off`` over the default arms (1 seed, one rate: ``--lr-grid 1``);
2. ``freezetune sweep --prune safe`` (the rule between arms; halving needs several rates);
3. ``freezetune train`` on each arm's config, as emitted by run 1.

Prints (and writes to ``<out>/bench_sweep.json``) each one's wall time, the ratios the sweep's
targets name, and both sweeps' recommendations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FREEZETUNE = [sys.executable, "-m", "freezetune"]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(FREEZETUNE + args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", default=["train.epochs=6"])
    a = parser.parse_args()
    # One rate, so that each arm is one `freezetune train` run to compare with.
    base = ["sweep", "--config", a.config, "--lr-grid", "1", *a.overrides]
    rows = {"no_prune": timed([*base, "--prune", "off", "--out", str(a.out / "no-prune")]),
            "prune": timed([*base, "--prune", "safe", "--out", str(a.out / "prune")])}
    plain = json.loads((a.out / "no-prune" / "sweep.json").read_text())
    pruned = json.loads((a.out / "prune" / "sweep.json").read_text())
    trains = {}
    for arm in plain["arms"]:
        cfg = a.out / "no-prune" / "configs" / arm / "seed-0.yaml"
        trains[arm] = timed(["train", "--config", str(cfg), f"output.dir={a.out / 'train' / arm}"])
    result = {
        "command": " ".join(["scripts/bench_sweep.py", "--out", str(a.out), "--config", a.config, *a.overrides]),
        "wall_s": {**rows, "train": trains, "train_sum": sum(trains.values())},
        "no_prune_vs_train_sum": rows["no_prune"] / sum(trains.values()),
        "prune_vs_train_full": rows["prune"] / trains["full"],
        "recommendation": {"no_prune": plain["recommendation"]["arm"], "prune": pruned["recommendation"]["arm"]},
        "pruned": {n: r["pruned_at_epoch"] for n, r in pruned["arms"].items() if r["status"] == "pruned"},
        "accuracy": {n: r["val_accuracy"]["mean"] for n, r in plain["arms"].items()},
        "device": plain["device"],
    }
    (a.out / "bench_sweep.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
