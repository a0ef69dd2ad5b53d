"""Replays successive-halving rules over an unpruned grid sweep: which rules keep each arm's winner, at what cost.

    .venv/bin/python scripts/replay_halving.py runs/m/grid-off [more sweep folders ...]

Reads every (arm, rate) curve of sweeps run with ``--prune off`` and, for each candidate rule
(where the rungs sit, what they rank on), replays the halving decisions from the curves alone,
as the sweep itself does. For each rule it prints, per sweep, how many arms kept the rate that
won the whole budget (or one within the tolerance of it), and the epochs trained as a share of
the unpruned grid's. This is how the shipped rule (``freezetune.sweep.halving``) was chosen; see
docs/sweep.md, "Choosing the rungs".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from freezetune.sweep import halving
from freezetune.sweep.halving import RateCurve


def load(folder: Path) -> tuple[int, dict[str, dict[float, RateCurve]], dict[str, dict[float, float]]]:
    """The sweep's epochs, per arm per rate its curve, and per arm per rate its final accuracy."""
    result = json.loads((folder / "sweep.json").read_text())
    curves, finals = {}, {}
    for name, arm in result["arms"].items():
        for rate in arm["lr_grid"]:
            seeds = rate["seeds"]
            if any(s["status"] == "nonfinite" for s in seeds):
                continue
            acc = rate["val_accuracy_by_epoch"]
            losses = [s.get("train_loss_by_epoch") or [None] * len(acc) for s in seeds]
            loss = [None if any(x[i] is None for x in losses) else sum(x[i] for x in losses) / len(losses)
                    for i in range(len(acc))]
            samples = _val_samples(folder, seeds)
            curves.setdefault(name, {})[rate["multiplier"]] = RateCurve(acc, loss, samples)
            finals.setdefault(name, {})[rate["multiplier"]] = rate["val_accuracy"]["mean"]
    return result["epochs"], curves, finals


def _val_samples(folder: Path, seeds: list[dict]) -> int:
    total = 0
    for s in seeds:
        rows = (folder / s["run_dir"] / "epochs.jsonl").read_text().splitlines()
        total += json.loads(rows[-1]).get("val_samples") or 0
    return total


def replay(epochs: int, rates: dict[float, RateCurve], fractions, first: int, noise: bool) -> tuple[dict, int]:
    """Halving under one rule: the stopped rates and the epochs trained."""
    saved = (halving.RUNG_FRACTIONS, halving.FIRST_RUNG)
    halving.RUNG_FRACTIONS, halving.FIRST_RUNG = fractions, first
    try:
        curves = rates if noise else {m: RateCurve(c.accuracy, c.train_loss, 0) for m, c in rates.items()}
        stopped = halving.halving_at(curves, epochs)
    finally:
        halving.RUNG_FRACTIONS, halving.FIRST_RUNG = saved
    return stopped, sum(stopped.get(m, epochs) for m in rates)


RULES = {
    "1/9, 1/3 (acc only)": ((1 / 9, 1 / 3), 1, False),
    "1/9, 1/3 (acc, loss in noise)": ((1 / 9, 1 / 3), 1, True),
    "1/5, 2/5 from 3 (acc only)": ((1 / 5, 2 / 5), 3, False),
    "1/5, 2/5 from 3 (shipped)": ((1 / 5, 2 / 5), 3, True),
    "1/3, 2/3 (acc, loss in noise)": ((1 / 3, 2 / 3), 1, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", type=Path)
    p.add_argument("--tolerance", type=float, default=0.01)
    a = p.parse_args()
    print("| rule | sweep | arms whose kept rate is within the tolerance of its best | epochs trained vs unpruned |")
    print("| --- | --- | --- | --- |")
    for rule, (fractions, first, noise) in RULES.items():
        for folder in a.sweeps:
            epochs, curves, finals = load(folder)
            kept, trained, total, lost = 0, 0, 0, []
            for arm, rates in curves.items():
                stopped, spent = replay(epochs, rates, fractions, first, noise)
                survivor = max((m for m in rates if m not in stopped), key=lambda m: finals[arm][m])
                best = max(finals[arm].values())
                if finals[arm][survivor] >= best - a.tolerance - 1e-12:
                    kept += 1
                else:
                    lost.append(f"{arm} {finals[arm][survivor]:.3f} vs {best:.3f}")
                trained, total = trained + spent, total + epochs * len(rates)
            where = f" (lost: {'; '.join(lost)})" if lost else ""
            print(f"| {rule} | {folder.name} | {kept}/{len(curves)}{where} | {trained / total:.2f} |")


if __name__ == "__main__":
    main()
