"""``sweep.json``: the typed record of a sweep, assembled from its run folders, and its CSV rows.

The in-process sweep and ``sweep --collect`` both read the finished run folders (``epochs.jsonl``
and ``summary.json`` of every (arm, rate, seed)) and call :func:`assemble`, so the two give the
same record from the same runs. Each arm is reported at its best rate, chosen on the validation
split by mean final accuracy; the other rates are listed under it.
Every key is declared; bump ``schema_version`` when one changes meaning
or goes away.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from freezetune.records import Record, Versions
from freezetune.sweep.analysis import (
    DEFAULT_TOLERANCE,
    Candidate,
    Stat,
    mean_curve,
    pareto,
    reached_stat,
    recommend,
    stat,
    time_to_target,
)

SWEEP_SCHEMA_VERSION = 2  # 2: each arm at its best learning rate, its grid's rates under it (keys added)
SELECTION = "each arm at its best learning rate, chosen on the validation split by mean final accuracy"
FINISHED = ("completed", "pruned", "nonfinite")


class StatRecord(Record):
    """Mean ± sample standard deviation over seeds (``sd`` is null for one seed)."""

    mean: float | None
    sd: float | None
    n: int


class SeedRun(Record):
    """One (arm, seed): a run folder, read back."""

    seed: int
    run_dir: str
    status: str  # completed | pruned | nonfinite | failed | interrupted | missing
    pruned_at_epoch: int | None = None
    val_accuracy_by_epoch: list[float | None]
    val_loss_by_epoch: list[float | None]
    train_loss_by_epoch: list[float | None] = []
    epoch_wall_s: list[float]
    val_s_by_epoch: list[float | None]
    cached_by_epoch: list[bool]
    final_accuracy: float | None
    best_accuracy: float | None
    wall_s: float
    val_s: float
    time_to_target_s: float | None = None
    epochs_to_target: int | None = None
    step_median_s: float | None
    peak_memory_bytes: int | None = None
    error: str | None = None
    started_at: float | None = None  # Unix time the run first started (its summary's started_at)
    ended_at: float | None = None  # Unix time it ended


class RateRecord(Record):
    """One rate of an arm's grid, over its seeds."""

    multiplier: float
    lr: float | None
    status: str
    pruned_at_epoch: int | None
    val_accuracy: StatRecord
    best_val_accuracy: StatRecord
    wall_s: StatRecord
    val_accuracy_by_epoch: list[float]
    seeds: list[SeedRun]


class ArmRecord(Record):
    """One arm over its seeds, at its best rate (``lr``); every rate it tried is in ``lr_grid``."""

    name: str
    label: str
    # Dotted config keys and the values the arm sets them to (``freeze.until: layer3``): any key of
    # the config schema, so the values are as open as the config's.
    overrides: dict[str, Any]
    status: str
    pruned_at_epoch: int | None
    val_accuracy: StatRecord
    best_val_accuracy: StatRecord
    wall_s: StatRecord
    val_s: StatRecord
    time_to_target_s: StatRecord
    epochs_to_target: StatRecord
    step_s: StatRecord
    val_accuracy_by_epoch: list[float]
    trainable_params: int
    trainable_pct: float
    flops_per_step: int | None
    feature_cache: bool
    peak_memory_bytes: int | None
    memory_kind: str
    on_pareto: bool
    seeds: list[SeedRun]
    saved_activation_bytes: int | None = None  # what one step saved for backward (memory pass)
    on_memory_pareto: bool = False  # on the front of accuracy against peak memory
    lr: float | None = None
    lr_multiplier: float = 1.0
    lr_edge: str | None = None  # low | high: the best rate is the grid's smallest or largest
    lr_grid: list[RateRecord] = []
    target_reached: int = 0  # seeds that reached the target; time_to_target_s is over those
    sweep_train_s: float = 0.0  # training seconds the sweep spent on the arm: every rate and seed


class SweepData(Record):
    """The base config's data section, as every arm trained on it."""

    source: str
    root: str | None
    image_size: int
    batch_size: int
    train_size: int
    val_size: int


class PruningRule(Record):
    """The pruning rules in words, and the epochs after which they are applied."""

    rule: str
    rungs: list[int]
    mode: str = "safe"  # off | safe | halving
    halving: str | None = None
    halving_rungs: list[int] = []


class RecommendationRecord(Record):
    """The arm to use and why (``sweep.analysis.Recommendation``)."""

    arm: str | None
    reason: str
    best: str | None
    eligible: list[str]
    indistinguishable: list[str]
    lr: float | None = None
    lr_multiplier: float | None = None
    config: str | None = None  # the recommended arm's config at its rate (seed of the first)


class SweepResult(Record):
    """What ``sweep.json`` holds."""

    schema_version: int = SWEEP_SCHEMA_VERSION
    kind: str = "sweep"
    freezetune_version: str
    model: str
    data: SweepData
    epochs: int
    seeds: list[int]
    target_accuracy: float | None
    target_source: str
    tolerance: float
    prune: bool
    pruning: PruningRule
    arms: dict[str, ArmRecord]
    pareto: list[str]
    recommendation: RecommendationRecord
    memory_pareto: list[str] = []  # by peak memory, smallest first; empty without the memory pass
    mode: str  # in-process | ray | collected
    lr_grid: list[float] = [1.0]
    base_lr: float | None = None  # the config's optim.lr, which the grid multiplies
    selection: str = SELECTION
    wall_s: float | None
    runs_train_s: float | None = None  # every run's training and validation seconds, summed
    overhead: float | None = None  # wall_s / runs_train_s (below 1 under Ray: runs overlapped)
    device: str | None
    versions: Versions
    out_dir: str
    files: dict[str, str]  # by extension: json, csv, png

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return self.model_dump(mode="json")


def seed_run(seed: int, run_dir: str, epochs: list[dict], summary: dict | None, failed: str | None = None) -> SeedRun:
    """Reads one run's ``epochs.jsonl`` rows and ``summary.json`` (None while it has not finished).

    ``failed`` is the one-line error of a run that raised (a Ray trial): it is reported ``failed``.
    """
    acc = [e["val_accuracy"] for e in epochs]
    seen = [a for a in acc if a is not None]
    status = summary["status"] if summary else ("failed" if failed else "interrupted" if epochs else "missing")
    timing = (summary or {}).get("timing_by_path", {})
    step = (timing.get("cached") or {}).get("step_median_s") or (timing.get("uncached") or {}).get("step_median_s")
    return SeedRun(
        seed=seed, run_dir=run_dir, status=status,
        pruned_at_epoch=len(epochs) if status == "pruned" else None,
        val_accuracy_by_epoch=acc,
        val_loss_by_epoch=[e["val_loss"] for e in epochs],
        train_loss_by_epoch=[e.get("train_loss") for e in epochs],
        epoch_wall_s=[e["train_s"] for e in epochs],
        val_s_by_epoch=[e["val_s"] for e in epochs],
        cached_by_epoch=[bool(e["cached"]) for e in epochs],
        final_accuracy=acc[-1] if acc else None,
        best_accuracy=max(seen) if seen else None,
        wall_s=sum(e["train_s"] for e in epochs),
        val_s=sum(e["val_s"] or 0.0 for e in epochs),
        step_median_s=step,
        error=(summary or {}).get("error") or failed,
        started_at=(summary or {}).get("started_at"),
        ended_at=(summary or {}).get("ended_at"),
    )


def assemble(arms: list[dict], runs: dict, facts: dict[str, dict], meta: dict,
             target: float | None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Builds the sweep record: each arm at its best rate, time to target, the Pareto front, the recommendation.

    Args:
        arms: The manifest's arms (``name``, ``label``, ``overrides``), in order.
        runs: Per arm, ``{rate multiplier: its seeds' runs}`` (a plain list of runs: one rate, 1).
        facts: Per arm, what does not depend on the seed or rate: ``trainable_params``,
            ``trainable_pct``, ``flops_per_step``, ``feature_cache``, ``peak_memory_bytes``,
            ``memory_kind``, ``saved_activation_bytes``, and ``base_lr`` (its rate at multiplier 1),
            ``config`` (a job config).
        meta: The record's other top-level keys (model, data, epochs, seeds, mode...).
        target: The target accuracy, or None for the best arm's mean final accuracy minus the tolerance.
        tolerance: Accuracy (a fraction) an arm may lose against the best and still be recommended.

    Returns:
        The record as a dict, validated by :class:`SweepResult`.
    """
    grids = {a["name"]: runs[a["name"]] if isinstance(runs[a["name"]], dict) else {1.0: runs[a["name"]]}
             for a in arms}
    chosen = {name: best_rate(grid) for name, grid in grids.items()}
    finals = {n: stat([r.final_accuracy for r in grids[n][m]]) for n, m in chosen.items()}
    done = [a["name"] for a in arms
            if _status(grids[a["name"]][chosen[a["name"]]]) == "completed" and finals[a["name"]].mean is not None]
    source = "given (--target)"
    if target is None:
        best = max((finals[n].mean for n in done), default=None)
        target = None if best is None else best - tolerance
        source = "the best arm's mean final accuracy minus the tolerance"
    records = {a["name"]: _arm_at_best(a, grids[a["name"]], chosen[a["name"]], facts[a["name"]], target)
               for a in arms}
    front = pareto({n: (records[n]["wall_s"]["mean"], records[n]["val_accuracy"]["mean"]) for n in done})
    memory_front = memory_pareto({n: records[n] for n in done})
    for name, rec in records.items():
        rec["on_pareto"] = name in front
        rec["on_memory_pareto"] = name in memory_front
    multi = any(len(g) > 1 for g in grids.values())
    rec = recommend([_candidate(records[n], multi) for n in done], tolerance).as_dict()
    if rec["arm"] is not None:
        pick = records[rec["arm"]]
        rec.update(lr=pick["lr"], lr_multiplier=pick["lr_multiplier"], config=facts[rec["arm"]].get("config"))
    data = {**meta, "target_accuracy": target, "target_source": source, "tolerance": tolerance,
            "arms": records, "pareto": front, "memory_pareto": memory_front, "recommendation": rec,
            "lr_grid": sorted({m for g in grids.values() for m in g})}
    return SweepResult.model_validate(data).to_dict()


def memory_pareto(records: dict[str, dict]) -> list[str]:
    """The arms no other beats on both peak memory and accuracy; empty unless every arm's memory was measured."""
    peaks = {n: r["peak_memory_bytes"] for n, r in records.items()}
    if not peaks or any(p is None for p in peaks.values()):
        return []
    return pareto({n: (peaks[n], records[n]["val_accuracy"]["mean"]) for n in records})


def best_rate(grid: dict[float, list[SeedRun]]) -> float:
    """The rate with the highest mean final validation accuracy among those that completed.

    Rates that were pruned or diverged are candidates only when no rate completed. Ties go to
    the higher best-so-far accuracy, then to the rate nearest the config's (multiplier 1).
    """
    def final(m: float) -> float:
        mean = stat([r.final_accuracy for r in grid[m]]).mean
        return -1.0 if mean is None else mean

    def best(m: float) -> float:
        mean = stat([r.best_accuracy for r in grid[m]]).mean
        return -1.0 if mean is None else mean

    completed = [m for m in grid if _status(grid[m]) == "completed"]
    pool = completed or list(grid)
    return max(pool, key=lambda m: (final(m), best(m), -abs(math.log(m))))


def _status(seeds: list[SeedRun]) -> str:
    statuses = {r.status for r in seeds}
    for status in ("missing", "interrupted", "failed", "nonfinite", "pruned"):
        if status in statuses:
            return status
    return "completed"


def _arm_at_best(arm: dict, grid: dict[float, list[SeedRun]], chosen: float, facts: dict,
                 target: float | None) -> dict:
    facts = dict(facts)
    base_lr, _ = facts.pop("base_lr", None), facts.pop("config", None)
    record = _arm(arm, grid[chosen], facts, target)
    rates = sorted(grid)
    lr = None if base_lr is None else float(f"{base_lr * chosen:.12g}")
    edge = None if len(rates) == 1 else ("low" if chosen == rates[0] else "high" if chosen == rates[-1] else None)
    record.update(
        lr=lr, lr_multiplier=chosen, lr_edge=edge,
        lr_grid=[_rate(m, grid[m], base_lr) for m in rates],
        sweep_train_s=sum(r.wall_s for m in rates for r in grid[m]),
    )
    return record


def _rate(multiplier: float, seeds: list[SeedRun], base_lr: float | None) -> dict:
    curves = [[a for a in r.val_accuracy_by_epoch if a is not None] for r in seeds]
    return {
        "multiplier": multiplier, "lr": None if base_lr is None else float(f"{base_lr * multiplier:.12g}"),
        "status": _status(seeds),
        "pruned_at_epoch": next((r.pruned_at_epoch for r in seeds if r.pruned_at_epoch), None),
        "val_accuracy": _s([r.final_accuracy for r in seeds]),
        "best_val_accuracy": _s([r.best_accuracy for r in seeds]),
        "wall_s": _s([r.wall_s for r in seeds]),
        "val_accuracy_by_epoch": mean_curve(curves), "seeds": [r.model_dump() for r in seeds],
    }


def _arm(arm: dict, seeds: list[SeedRun], facts: dict, target: float | None) -> dict:
    for r in seeds:
        if target is not None:
            r.time_to_target_s, r.epochs_to_target = time_to_target(r.val_accuracy_by_epoch, r.epoch_wall_s, target)
    status = _status(seeds)
    curves = [[a for a in r.val_accuracy_by_epoch if a is not None] for r in seeds]
    return {
        "name": arm["name"], "label": arm["label"], "overrides": arm["overrides"], "status": status,
        "pruned_at_epoch": next((r.pruned_at_epoch for r in seeds if r.pruned_at_epoch), None),
        "val_accuracy": _s([r.final_accuracy for r in seeds]),
        "best_val_accuracy": _s([r.best_accuracy for r in seeds]),
        "wall_s": _s([r.wall_s for r in seeds]),
        "val_s": _s([r.val_s for r in seeds]),
        "time_to_target_s": reached_stat([r.time_to_target_s for r in seeds]).as_dict(),
        "epochs_to_target": reached_stat([r.epochs_to_target for r in seeds]).as_dict(),
        "target_reached": sum(r.time_to_target_s is not None for r in seeds),
        "step_s": _s([r.step_median_s for r in seeds]),
        "val_accuracy_by_epoch": mean_curve(curves),
        **facts,
        "on_pareto": False,
        "seeds": [r.model_dump() for r in seeds],
    }


def _s(values: list) -> dict:
    return stat(values).as_dict()


def _candidate(arm: dict, with_rate: bool) -> Candidate:
    """What the recommendation weighs; with a rate grid, the label names the arm's best rate."""
    acc = arm["val_accuracy"]
    label = arm["label"]
    if with_rate and arm["lr"] is not None:
        label += f" at lr {arm['lr']:g} ({arm['lr_multiplier']:g}x)"
    return Candidate(arm["name"], label, Stat(acc["mean"], acc["sd"], acc["n"]), arm["wall_s"]["mean"],
                     arm["time_to_target_s"]["mean"], arm["target_reached"])


# --------------------------------------------------------------------------------------------
# CSV

CSV_COLUMNS = (
    "arm", "seed", "label", "status", "pruned_at_epoch", "val_accuracy", "val_accuracy_sd", "best_val_accuracy",
    "wall_s", "wall_s_sd", "val_s", "time_to_target_s", "time_to_target_s_sd", "epochs_to_target", "step_s",
    "trainable_pct", "flops_per_step", "feature_cache", "peak_memory_bytes", "on_pareto", "recommended",
    "lr", "lr_multiplier", "best_rate",  # added with rate grids: after the older columns, which readers index
    "saved_activation_bytes", "on_memory_pareto",  # added with the memory view
)


def csv_rows(result: dict) -> list[dict]:
    """One row per arm at its best rate (``seed`` = ``mean``, with sds), then one per (arm, rate, seed)."""
    rows = []
    pick = result["recommendation"]["arm"]
    for name, arm in result["arms"].items():
        common = {"arm": name, "label": arm["label"], "trainable_pct": arm["trainable_pct"],
                  "flops_per_step": arm["flops_per_step"], "feature_cache": arm["feature_cache"],
                  "peak_memory_bytes": arm["peak_memory_bytes"], "on_pareto": arm["on_pareto"],
                  "saved_activation_bytes": arm.get("saved_activation_bytes"),
                  "on_memory_pareto": arm.get("on_memory_pareto", False), "recommended": name == pick}
        rows.append({**common, "seed": "mean", "lr": arm.get("lr"), "lr_multiplier": arm.get("lr_multiplier"),
                     "best_rate": True, "status": arm["status"], "pruned_at_epoch": arm["pruned_at_epoch"],
                     "val_accuracy": arm["val_accuracy"]["mean"], "val_accuracy_sd": arm["val_accuracy"]["sd"],
                     "best_val_accuracy": arm["best_val_accuracy"]["mean"], "wall_s": arm["wall_s"]["mean"],
                     "wall_s_sd": arm["wall_s"]["sd"], "val_s": arm["val_s"]["mean"],
                     "time_to_target_s": arm["time_to_target_s"]["mean"],
                     "time_to_target_s_sd": arm["time_to_target_s"]["sd"],
                     "epochs_to_target": arm["epochs_to_target"]["mean"], "step_s": arm["step_s"]["mean"]})
        rates = arm.get("lr_grid") or [{"multiplier": arm.get("lr_multiplier", 1.0), "lr": arm.get("lr"),
                                         "seeds": arm["seeds"]}]
        for rate in rates:
            best = rate["multiplier"] == arm.get("lr_multiplier", 1.0)
            for r in (arm["seeds"] if best else rate["seeds"]):  # the best rate's carry their time to target
                rows.append({**common, "seed": r["seed"], "lr": rate["lr"], "lr_multiplier": rate["multiplier"],
                             "best_rate": best, "status": r["status"], "pruned_at_epoch": r["pruned_at_epoch"],
                             "val_accuracy": r["final_accuracy"], "best_val_accuracy": r["best_accuracy"],
                             "wall_s": r["wall_s"], "val_s": r["val_s"], "time_to_target_s": r["time_to_target_s"],
                             "epochs_to_target": r["epochs_to_target"], "step_s": r["step_median_s"]})
    return rows


def to_csv(result: dict) -> str:
    """``sweep.csv``: :func:`csv_rows` under a fixed header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="raise")
    writer.writeheader()
    for row in csv_rows(result):
        writer.writerow({k: row.get(k) for k in CSV_COLUMNS})
    return buf.getvalue()
