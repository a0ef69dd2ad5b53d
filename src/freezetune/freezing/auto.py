"""Adaptive freezing (``freeze.auto``): stages freeze, input side first, once they clearly stop learning.

The criterion follows AutoFreeze (Liu et al., 2021), with checks measured in steps as there. Every
step, after the update, the gradient norm of each trainable stage and its square are added to
running sums (on the device, no synchronization). The run is cut into intervals of a fixed number
of steps (``freeze.auto.checks`` per run, or ``every_steps``). After the step that closes one,
mid-epoch included, each stage's *change* is ``|mean_now - mean_before| / mean_before`` against
the interval before: a stage whose gradient norm has stopped changing has stopped moving in a new
direction.

On little data those means are mostly noise, and a rule that reads them at face value freezes
on it (the issue that brought this in: 60 steps, every stage frozen by epoch 5, 18 points lost).
So a stage freezes only when its change is below the cut *by more than the noise*: the change
plus ``noise_z`` standard errors of the difference of the two means (from the spread of the
per-step norms in each interval) must stay below the cut, and an interval of fewer than
``min_steps`` steps freezes nothing at all. The longest run of such stages from the input side
freezes, so the frozen prefix only grows; the head never freezes, nor anything past ``max_stage``.
A "stage" here is a unit of ``freeze.auto.units``: by default a ResNet's residual block
(``layer2.0``, :func:`~freezetune.models.catalog.block_points`), or a whole stage (``layer2``).

The cut is the ``percentile`` of the changes of every trainable stage (head included), as in
AutoFreeze, or a fixed ``threshold``. :func:`judge` is the whole decision, a pure function of the
two intervals' statistics. This module makes the ``requires_grad`` decisions and records each
frozen tensor's sha256 at that moment; the freeze controller removes the parameters from the
optimizer and the recipe rebuilds the execution path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from freezetune.config import DEFAULT_TOLERANCE, AutoFreezeConfig
from freezetune.errors import FreezeError
from freezetune.freezing.integrity import combined_sha256, fingerprint
from freezetune.freezing.plan import FreezePlan
from freezetune.models.catalog import block_points, last_block, stages
from freezetune.models.structure import stage_members_cover

HEAD = "head"


@dataclass
class FreezeEvent:
    """One stage frozen mid-run, as ``summary.json`` lists it under ``auto_freeze.events``.

    Attributes:
        step: Optimizer steps taken when it froze (it is frozen from step ``step + 1``).
        epoch: The epoch it froze in (0-based; mid-epoch when the step is not an epoch's last).
        stage: The freeze point, as ``freezetune models`` names it.
        change: Its relative change of mean gradient norm between the last two intervals.
        cut: The value ``bound`` had to be below (the percentile, or the threshold).
        criterion: ``percentile`` or ``threshold``.
        grad_norm: Its mean gradient norm per step over the last interval.
        tensors: Parameters (and, with ``batchnorm: frozen``, BatchNorm buffers) frozen.
        params: Scalar parameters frozen.
        optimizer_bytes_freed: Momentum-buffer bytes released (set by the recipe).
        sha256: Combined digest of the stage's tensors at that moment.
        bound: ``change`` plus ``noise_z`` standard errors: what was held to the cut.
        hashes: Per-tensor digests, kept in the checkpoint and checked at the end of the run.
    """

    step: int
    epoch: int
    stage: str
    change: float
    cut: float
    criterion: str
    grad_norm: float
    tensors: int
    params: int
    sha256: str
    optimizer_bytes_freed: int = 0
    bound: float | None = None  # None in checkpoints written before the noise-aware rule
    hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def as_dict(self, hashes: bool = False) -> dict:
        """Plain data; per-tensor hashes only when asked (the checkpoint wants them, people do not)."""
        data = asdict(self)
        if not hashes:
            data.pop("hashes")
        return data

    @property
    def line(self) -> str:
        """The console line, e.g. ``step 120: froze layer1 (grad change 0.8% ± 0.6% < 2.1%, ...)``."""
        cut = f"{self.cut:.1%}"
        if self.criterion == "threshold":
            cut += " threshold"
        noise = f" + noise {self.bound - self.change:.1%}" if self.bound is not None else ""
        return (f"step {self.step}: froze {self.stage} (grad change {self.change:.1%}{noise} < {cut}; "
                f"{self.params:,} params, {self.optimizer_bytes_freed / 2**20:.1f} MiB freed)")


@dataclass
class AccuracyDrop:
    """A validation accuracy more than the tolerance below the run's best so far, after a freeze.

    Attributes:
        epoch: The epoch validated.
        step: Optimizer steps taken by then.
        accuracy: Its validation accuracy.
        best: The best validation accuracy before it, and ``best_epoch`` the epoch that had it.
        drop: ``best - accuracy``.
        tolerance: The drop allowed (the sweep's default tolerance).
        frozen: The stages ``freeze.auto`` had frozen by then.
    """

    epoch: int
    step: int
    accuracy: float
    best: float
    best_epoch: int
    drop: float
    tolerance: float
    frozen: list[str]

    @property
    def line(self) -> str:
        """The console line: what fell, from where, and what had frozen."""
        return (f"epoch {self.epoch}: val accuracy {self.accuracy:.3f} is {self.drop:.3f} below the best so far "
                f"({self.best:.3f}, epoch {self.best_epoch}) since freeze.auto froze {', '.join(self.frozen)}; "
                f"full fine-tuning may do better here (more than the {self.tolerance:g} tolerance)")


def fell(best: float | None, accuracy: float, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """The guard's rule: whether ``accuracy`` is more than ``tolerance`` below the ``best`` so far."""
    # 1e-9: 0.80 - 0.79 is 0.010000000000000009 in floating point, and exactly the tolerance is within it.
    return best is not None and best - accuracy > tolerance + 1e-9


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class StageStats:
    """One stage's gradient norm over one interval: its mean and spread per step, and the step count."""

    mean: float
    sd: float
    steps: int

    @classmethod
    def of(cls, total: float, squares: float, steps: int) -> StageStats:
        """From running sums of the norm and its square (the sample standard deviation; 0 from one step)."""
        mean = total / steps
        var = (squares - total * total / steps) / (steps - 1) if steps > 1 else 0.0
        return cls(mean, math.sqrt(max(var, 0.0)), steps)


@dataclass(frozen=True)
class Verdict:
    """One check's decision and everything it was made from (``summary.json``'s ``auto_freeze.checks``).

    Attributes:
        changes: Each stage's relative change of mean norm (head included).
        bounds: The change plus ``noise_z`` standard errors of the difference of the two means,
            relative to the earlier mean: what a stage's change could be, given the noise.
        cut: What a candidate's bound had to be below.
        froze: The candidates that freeze, input side first.
        reason: Why nothing may freeze at this check, or None.
    """

    changes: dict[str, float]
    bounds: dict[str, float]
    cut: float
    froze: list[str]
    reason: str | None = None


def judge(now: dict[str, StageStats], before: dict[str, StageStats], candidates: list[str],
          cfg: AutoFreezeConfig) -> Verdict:
    """The pure decision of one check: which candidate stages freeze, and why.

    Args:
        now: Each trainable stage's statistics over the interval that just closed (head included).
        before: The same over the interval before it.
        candidates: Trainable stages that may freeze, in input-to-output order.
        cfg: The criterion (``percentile`` or ``threshold``, ``noise_z``, ``min_steps``).

    Returns:
        The leading candidates whose change is below the cut by more than the noise (the prefix
        only grows), with the figures behind the decision.
    """
    common = [s for s in now if s in before]
    changes, bounds = {}, {}
    for s in common:
        a, b = before[s], now[s]
        if a.mean <= 0:  # a zero norm counts as moving
            changes[s] = bounds[s] = math.inf
            continue
        changes[s] = abs(b.mean - a.mean) / a.mean
        noise = math.sqrt(a.sd ** 2 / a.steps + b.sd ** 2 / b.steps) / a.mean
        bounds[s] = changes[s] + cfg.noise_z * noise
    if not changes:
        return Verdict({}, {}, 0.0, [], "no stage measured in both intervals")
    cut = percentile(list(changes.values()), cfg.percentile) if cfg.criterion == "percentile" else cfg.threshold
    fewest = min(min(now[s].steps, before[s].steps) for s in common)
    if fewest < cfg.min_steps:
        return Verdict(changes, bounds, cut, [], f"{fewest} steps in an interval, fewer than min_steps "
                                                  f"{cfg.min_steps}")
    chosen = []
    for stage in candidates:
        if stage not in bounds or not bounds[stage] < cut:
            break
        chosen.append(stage)
    return Verdict(changes, bounds, cut, chosen)


class GradNormMeter:
    """Sums each stage's gradient norm, and its square, per step on the device; read once per interval.

    One ``torch._foreach_norm`` over the trainable gradients and an ``index_add_`` per step, with
    no host synchronization. Measured end to end in docs/auto-freeze.md ("What the meter costs",
    scripts/bench_auto.py).
    """

    def __init__(self, groups: dict[str, list[nn.Parameter]]):
        self.stages = [s for s, params in groups.items() if params]
        self._params = [p for s in self.stages for p in groups[s]]
        self._owner = [i for i, s in enumerate(self.stages) for _ in groups[s]]
        self._index: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None  # float64 per stage, on the gradients' device
        self.squares: torch.Tensor | None = None
        self.steps: torch.Tensor | None = None
        self._restored: tuple[list[float], list[float], int] | None = None

    def observe(self) -> None:
        """Adds this step's per-stage gradient norms (call after the update; grads are unscaled then)."""
        with_grad = [(i, p.grad) for i, p in zip(self._owner, self._params, strict=True) if p.grad is not None]
        if not with_grad:
            return
        device = with_grad[0][1].device
        self._allocate(device)
        if len(with_grad) == len(self._params):
            index = self._index
        else:
            index = torch.tensor([i for i, _ in with_grad], device=device)
        norms = torch.stack(torch._foreach_norm([g for _, g in with_grad])).double()
        squared = torch.zeros_like(self.sum).index_add_(0, index, norms * norms)
        finite = torch.isfinite(squared).all()  # an fp16 step skipped for overflow is not counted
        self.sum += torch.where(finite, squared.sqrt(), torch.zeros_like(squared))
        self.squares += torch.where(finite, squared, torch.zeros_like(squared))
        self.steps += finite.long()

    def _allocate(self, device: torch.device) -> None:
        if self.sum is not None:
            return
        self._index = torch.tensor(self._owner, device=device)
        sums, squares, steps = self._restored or ([0.0] * len(self.stages), [0.0] * len(self.stages), 0)
        self.sum = torch.tensor(sums, dtype=torch.float64, device=device)
        self.squares = torch.tensor(squares, dtype=torch.float64, device=device)
        self.steps = torch.tensor(steps, dtype=torch.long, device=device)

    def stats(self) -> dict[str, StageStats]:
        """Each stage's mean norm per step and its spread since the last reset (empty if no step counted)."""
        sums, squares, steps = self._values()
        if not steps:
            return {}
        return {s: StageStats.of(v, q, steps) for s, v, q in zip(self.stages, sums, squares, strict=True)}

    def reset(self) -> None:
        """Starts a new interval."""
        self.sum = self.squares = self.steps = None
        self._restored = None

    def _values(self) -> tuple[list[float], list[float], int]:
        if self.sum is None:
            return self._restored or ([0.0] * len(self.stages), [0.0] * len(self.stages), 0)
        return self.sum.tolist(), self.squares.tolist(), int(self.steps.item())

    def state_dict(self) -> dict:
        """The running sums as plain floats (float64 round-trips exactly)."""
        sums, squares, steps = self._values()
        return {"stages": list(self.stages), "sum": sums, "squares": squares, "steps": steps}

    def load_state_dict(self, state: dict) -> None:
        """Continues the interval a checkpoint was saved in."""
        if list(state["stages"]) != self.stages:
            raise ValueError(f"grad-norm meter stages {state['stages']} differ from {self.stages}")
        self.reset()
        self._restored = (list(state["sum"]), list(state["squares"]), int(state["steps"]))


class AutoFreezer:
    """The ``freeze.auto`` state of one run: the meter, the last interval, and the events so far.

    Args:
        cfg: The ``freeze.auto`` section.
        model: The model, already frozen by the initial freeze spec.
        plan: Its freeze plan (updated in place when stages freeze).
        model_name: For the model's freeze points.

    Raises:
        FreezeError: If ``max_stage`` is not a freeze point of the model, or the model has fewer
            than one stage that could freeze.
    """

    def __init__(self, cfg: AutoFreezeConfig, model: nn.Module, plan: FreezePlan, model_name: str):
        self.cfg, self.model, self.plan = cfg, model, plan
        self.order = block_points(model_name) if cfg.units == "blocks" else stages(model_name)
        points = [s for s in self.order if s != HEAD]
        # By default every unit but the head may freeze; the criterion decides how far it goes.
        last = points[-1] if cfg.max_stage is None else _last_unit(model_name, cfg.max_stage, points)
        self.may_freeze = points[: points.index(last) + 1]
        self.events: list[FreezeEvent] = []
        self.checks: list[dict] = []  # every check's figures and verdict, frozen or not
        self.previous: dict[str, StageStats] | None = None
        self.interval: int | None = None  # steps per interval, set by start()
        self.last_check = 0  # the step of the last check
        self.meter = GradNormMeter(self._groups())
        self.best: tuple[float, int] | None = None  # the best validation accuracy so far, and its epoch
        self.drops: list[AccuracyDrop] = []

    def _check_units(self, state: dict) -> None:
        """Refuses a checkpoint whose meter counted other units (``freeze.auto.units`` changed)."""
        counted = list(state["meter"]["stages"]) + [e["stage"] for e in state["events"]]
        if any(u not in self.order for u in counted):
            # Only a folder written before block units (or a hand-edited config.yaml) gets here:
            # a resume may not change freeze options.
            other = "stages" if self.cfg.units == "blocks" else "blocks"
            raise FreezeError(f"the checkpoint's freeze.auto measured {', '.join(state['meter']['stages'])}, "
                              f"not the config's units ({self.cfg.units}); set units: {other} under freeze.auto in "
                              "the run's config.yaml to resume it")

    def _groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per stage, in model order; a parameter belongs to its first stage."""
        groups: dict[str, list[nn.Parameter]] = {s: [] for s in self.order}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                stage = next((s for s, m in self.order.items() if stage_members_cover(name, m)), HEAD)
                groups[stage].append(p)
        return groups

    def candidates(self) -> list[str]:
        """Stages that may still freeze, input side first (stages frozen from the start are passed over)."""
        trainable = set(self.meter.stages)
        return [s for s in self.may_freeze if s in trainable]

    def start(self, total_steps: int) -> None:
        """Sets the interval for a run of ``total_steps`` (a resumed run keeps its checkpoint's)."""
        if self.interval is None:
            self.interval = self.cfg.interval(total_steps)

    def at_step(self, step: int, epoch: int) -> list[FreezeEvent]:
        """After optimizer step ``step``: closes an interval if one ends here, and freezes what :func:`judge` chooses.

        Calling it again for the same step does nothing, so a resumed run can call it for the
        step its checkpoint was saved at (saved before that step's check ran).

        Returns:
            The new events (their ``optimizer_bytes_freed`` is for the caller to fill in).
        """
        if self.interval is None or step <= self.last_check or step % self.interval or not self.candidates():
            return []
        self.last_check = step
        now = self.meter.stats()
        events: list[FreezeEvent] = []
        if now and self.previous is not None:
            verdict = judge(now, self.previous, self.candidates(), self.cfg)
            self.checks.append(_check_record(step, epoch, now, verdict, self.candidates()))
            events = [self._freeze(stage, epoch, step, verdict, now[stage].mean) for stage in verdict.froze]
        frozen = {e.stage for e in events}
        self.previous = {s: v for s, v in now.items() if s not in frozen} if now else None
        if events:
            self.meter = GradNormMeter(self._groups())
        else:
            self.meter.reset()
        self.events += events
        return events

    def validated(self, epoch: int, step: int, accuracy: float) -> AccuracyDrop | None:
        """The guard: after each validation, whether the run fell below its best so far since a freeze.

        It only reports: stages stay frozen (unfreezing would have to undo the optimizer's and the
        cache's changes, and a drop on a small validation split can be noise too). The drop is
        returned for the caller to say; it is kept for the summary and the checkpoint.
        """
        drop = None
        if self.events and self.best is not None and fell(self.best[0], accuracy):
            drop = AccuracyDrop(epoch, step, accuracy, self.best[0], self.best[1], self.best[0] - accuracy,
                                DEFAULT_TOLERANCE, [e.stage for e in self.events])
            self.drops.append(drop)
        if self.best is None or accuracy > self.best[0]:
            self.best = (accuracy, epoch)
        return drop

    def _freeze(self, stage: str, epoch: int, step: int, verdict: Verdict, norm: float) -> FreezeEvent:
        newly = freeze_stage(self.model, self.plan, self.order[stage])
        hashes = fingerprint(self.model, FreezePlan(frozen=newly, frozen_bn=self._stage_bn(stage)))
        return FreezeEvent(step=step, epoch=epoch, stage=stage, change=verdict.changes[stage], cut=verdict.cut,
                           criterion=self.cfg.criterion, grad_norm=norm, tensors=len(hashes),
                           params=_numel(self.model, newly), sha256=combined_sha256(hashes),
                           bound=verdict.bounds[stage], hashes=hashes)

    def _stage_bn(self, stage: str) -> list[str]:
        return [n for n in self.plan.frozen_bn if stage_members_cover(n, self.order[stage])]

    def frozen_names(self) -> set[str]:
        """Every tensor frozen mid-run (parameters and frozen BatchNorm buffers)."""
        return {name for e in self.events for name in e.hashes}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: events, the last interval, the meter."""
        previous = None if self.previous is None else {s: asdict(v) for s, v in self.previous.items()}
        return {"events": [e.as_dict(hashes=True) for e in self.events], "checks": self.checks,
                "previous": previous, "interval": self.interval, "last_check": self.last_check,
                "meter": self.meter.state_dict(), "best": self.best, "drops": [asdict(d) for d in self.drops]}

    def load_state_dict(self, state: dict) -> list[FreezeEvent]:
        """Re-freezes the stages a checkpoint had frozen, in order, and continues its interval.

        Returns:
            The replayed events (the caller removes their parameters from the optimizer).

        Raises:
            FreezeError: For a checkpoint of the epoch-level rule this version replaced.
        """
        if "interval" not in state:
            raise FreezeError("the checkpoint's freeze.auto state is from an earlier version that checked once "
                              "per epoch; it cannot continue under step-level checks: train the run again")
        self._check_units(state)
        for data in state["events"]:
            freeze_stage(self.model, self.plan, self.order[data["stage"]])
            self.events.append(FreezeEvent(**data))
        self.checks = list(state["checks"])
        self.previous = None if state["previous"] is None else {
            s: StageStats(**v) for s, v in state["previous"].items()}
        self.interval, self.last_check = state["interval"], int(state["last_check"])
        self.best = None if state["best"] is None else (float(state["best"][0]), int(state["best"][1]))
        self.drops = [AccuracyDrop(**d) for d in state["drops"]]
        self.meter = GradNormMeter(self._groups())
        self.meter.load_state_dict(state["meter"])
        return list(self.events)

    def summary(self) -> dict:
        """The ``auto_freeze`` section of ``summary.json``."""
        return {"config": self.cfg.model_dump(mode="json"), "events": [e.as_dict() for e in self.events],
                "checks": self.checks, "stages_frozen": [e.stage for e in self.events],
                "params_frozen": sum(e.params for e in self.events),
                "optimizer_bytes_freed": sum(e.optimizer_bytes_freed for e in self.events),
                "guard": {"tolerance": DEFAULT_TOLERANCE, "best_accuracy": self.best[0] if self.best else None,
                          "best_epoch": self.best[1] if self.best else None,
                          "drops": [asdict(d) for d in self.drops]}}


def _last_unit(model_name: str, max_stage: str, points: list[str]) -> str:
    """``max_stage`` as a unit: itself, or a stage's last block when the units are blocks.

    Raises:
        FreezeError: If it is not a freeze point of the model, or a block while the units are stages.
    """
    as_block = last_block(model_name, max_stage) if max_stage in stages(model_name) else max_stage
    for unit in (max_stage, as_block):
        if unit in points:
            return unit
    raise FreezeError(f"freeze.auto.max_stage: {max_stage!r} is not a freeze point of {model_name} in these units; "
                      f"use one of {', '.join(points)}")


def _check_record(step: int, epoch: int, now: dict[str, StageStats], verdict: Verdict,
                  candidates: list[str]) -> dict:
    """One check as ``summary.json`` lists it: the figures, the cut and the decision."""
    return {"step": step, "epoch": epoch, "changes": verdict.changes, "bounds": verdict.bounds, "cut": verdict.cut,
            "steps": min((v.steps for v in now.values()), default=0),
            "grad_norm": {s: [v.mean, v.sd] for s, v in now.items()},
            "candidates": candidates, "froze": verdict.froze, "reason": verdict.reason}


def freeze_stage(model: nn.Module, plan: FreezePlan, members: tuple[str, ...]) -> list[str]:
    """Freezes a stage's trainable parameters in place and updates the plan.

    Its BatchNorm layers follow ``plan.batchnorm``: with ``frozen`` they join ``plan.frozen_bn``,
    so :func:`freezetune.freezing.plan.set_train_mode` keeps them in eval mode from now on.

    Returns:
        The names of the parameters that froze, in model order.
    """
    newly = []
    for name, p in model.named_parameters():
        if p.requires_grad and stage_members_cover(name, members):
            p.requires_grad_(False)
            newly.append(name)
    frozen = set(newly) | set(plan.frozen)
    plan.trainable = [n for n in plan.trainable if n not in frozen]
    plan.frozen = [n for n, _ in model.named_parameters() if n in frozen]
    if plan.batchnorm == "frozen":
        known = set(plan.frozen_bn)
        plan.frozen_bn += [
            n for n, m in model.named_modules()
            if n not in known and stage_members_cover(n, members)
            and isinstance(m, nn.modules.batchnorm._BatchNorm)
            and all(not p.requires_grad for p in m.parameters(recurse=False))
        ]
    return newly


def _numel(model: nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)
