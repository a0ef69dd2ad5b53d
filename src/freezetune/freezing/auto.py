"""Adaptive freezing (``freeze.auto``): stages freeze, input side first, once they stop learning.

The criterion follows AutoFreeze (Liu et al., 2021). Every step, after the update, the gradient
norm of each trainable stage is added to a running sum (on the device, no synchronization). At an
interval boundary (an epoch start) the sums become per-step means, and each stage's *change* is
``|mean_now - mean_before| / mean_before`` against the interval before. A stage whose gradient
norm has stopped changing has stopped moving in a new direction: it is converging. The longest run
of trainable stages from the input side whose change is below the cut freezes, so the frozen
prefix only grows; the head never freezes, nor anything past ``max_stage``.

The cut is the ``percentile`` of the changes of every trainable stage (head included), as in
AutoFreeze, or a fixed ``threshold``. This module makes the ``requires_grad`` decisions and
records each frozen tensor's sha256 at that moment; the recipe removes the parameters from the
optimizer and rebuilds the execution path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from freezetune.config import AutoFreezeConfig
from freezetune.errors import FreezeError
from freezetune.freezing.integrity import combined_sha256, fingerprint
from freezetune.freezing.plan import FreezePlan
from freezetune.models.catalog import stages
from freezetune.models.structure import stage_members_cover

HEAD = "head"


@dataclass
class FreezeEvent:
    """One stage frozen mid-run, as ``summary.json`` lists it under ``auto_freeze.events``.

    Attributes:
        step: Optimizer steps taken when it froze (it is frozen from step ``step + 1``).
        epoch: The epoch at whose start it froze.
        stage: The freeze point, as ``freezetune models`` names it.
        change: Its relative change of mean gradient norm between the last two intervals.
        cut: The value ``change`` had to be below (the percentile, or the threshold).
        criterion: ``percentile`` or ``threshold``.
        grad_norm: Its mean gradient norm per step over the last interval.
        tensors: Parameters (and, with ``batchnorm: frozen``, BatchNorm buffers) frozen.
        params: Scalar parameters frozen.
        optimizer_bytes_freed: Momentum-buffer bytes released (set by the recipe).
        sha256: Combined digest of the stage's tensors at that moment.
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
    hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def as_dict(self, hashes: bool = False) -> dict:
        """Plain data; per-tensor hashes only when asked (the checkpoint wants them, people do not)."""
        data = asdict(self)
        if not hashes:
            data.pop("hashes")
        return data

    @property
    def line(self) -> str:
        """The console line, e.g. ``step 120: froze layer1 (grad change 0.8% < 2.1%, ...)``."""
        cut = f"{self.cut:.1%}"
        if self.criterion == "threshold":
            cut += " threshold"
        return (f"step {self.step}: froze {self.stage} (grad change {self.change:.1%} < {cut}; "
                f"{self.params:,} params, {self.optimizer_bytes_freed / 2**20:.1f} MiB freed)")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def relative_changes(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """``|now - before| / before`` for every stage measured in both intervals (a zero norm counts as moving)."""
    return {s: abs(now[s] - before[s]) / before[s] if before[s] > 0 else float("inf")
            for s in now if s in before}


def choose(changes: dict[str, float], candidates: list[str], cfg: AutoFreezeConfig) -> tuple[list[str], float]:
    """The pure decision: which candidate stages freeze now, and the cut they were held to.

    Args:
        changes: Relative change per trainable stage (head included, for the percentile).
        candidates: Trainable stages that may freeze, in input-to-output order.
        cfg: The criterion.

    Returns:
        The leading candidates whose change is below the cut (the prefix only grows), and the cut.
    """
    if not changes:
        return [], 0.0
    cut = percentile(list(changes.values()), cfg.percentile) if cfg.criterion == "percentile" else cfg.threshold
    chosen = []
    for stage in candidates:
        if stage not in changes or not changes[stage] < cut:
            break
        chosen.append(stage)
    return chosen, cut


class GradNormMeter:
    """Sums each stage's gradient norm per step on the device; read once per interval.

    One ``torch._foreach_norm`` over the trainable gradients and an ``index_add_`` per step, with
    no host synchronization. Measured (scripts/bench_auto.py, full fine-tuning, 64 px, batch 32,
    2-core CPU): steps took 3.5% longer with it (643 against 622 ms, medians of 40 interleaved
    rounds; raw: benchmarks/auto-freeze/meter-cpu-2threads-torch2.14.1.json).
    """

    def __init__(self, groups: dict[str, list[nn.Parameter]]):
        self.stages = [s for s, params in groups.items() if params]
        self._params = [p for s in self.stages for p in groups[s]]
        self._owner = [i for i, s in enumerate(self.stages) for _ in groups[s]]
        self._index: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None  # float64 per stage, on the gradients' device
        self.steps: torch.Tensor | None = None
        self._restored: tuple[list[float], int] | None = None

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
        per_stage = torch.zeros_like(self.sum).index_add_(0, index, norms * norms).sqrt()
        finite = torch.isfinite(per_stage).all()  # an fp16 step skipped for overflow is not counted
        self.sum += torch.where(finite, per_stage, torch.zeros_like(per_stage))
        self.steps += finite.long()

    def _allocate(self, device: torch.device) -> None:
        if self.sum is not None:
            return
        self._index = torch.tensor(self._owner, device=device)
        sums, steps = self._restored or ([0.0] * len(self.stages), 0)
        self.sum = torch.tensor(sums, dtype=torch.float64, device=device)
        self.steps = torch.tensor(steps, dtype=torch.long, device=device)

    def means(self) -> dict[str, float]:
        """Mean gradient norm per step of each stage since the last reset (empty if no step counted)."""
        sums, steps = self._values()
        return {s: v / steps for s, v in zip(self.stages, sums, strict=True)} if steps else {}

    def reset(self) -> None:
        """Starts a new interval."""
        self.sum = self.steps = None
        self._restored = None

    def _values(self) -> tuple[list[float], int]:
        if self.sum is None:
            return self._restored or ([0.0] * len(self.stages), 0)
        return self.sum.tolist(), int(self.steps.item())

    def state_dict(self) -> dict:
        """The running sums as plain floats (float64 round-trips exactly)."""
        sums, steps = self._values()
        return {"stages": list(self.stages), "sum": sums, "steps": steps}

    def load_state_dict(self, state: dict) -> None:
        """Continues the interval a checkpoint was saved in."""
        if list(state["stages"]) != self.stages:
            raise ValueError(f"grad-norm meter stages {state['stages']} differ from {self.stages}")
        self.reset()
        self._restored = (list(state["sum"]), int(state["steps"]))


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
        self.order = stages(model_name)
        points = [s for s in self.order if s != HEAD]
        if cfg.max_stage is not None and cfg.max_stage not in points:
            raise FreezeError(f"freeze.auto.max_stage: {cfg.max_stage!r} is not a freeze point of {model_name}; "
                              f"use one of {', '.join(points)}")
        # By default every stage but the head may freeze; the criterion decides how far it goes.
        last = cfg.max_stage or points[-1]
        self.may_freeze = points[: points.index(last) + 1]
        self.events: list[FreezeEvent] = []
        self.checks: list[dict] = []  # every boundary's criterion values, frozen or not
        self.previous: dict[str, float] | None = None
        self.last_boundary = -1
        self.meter = GradNormMeter(self._groups())

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

    def is_boundary(self, epoch: int) -> bool:
        """Whether an interval ends at the start of ``epoch`` (and has not been handled yet)."""
        return epoch > self.last_boundary and epoch > 0 and (epoch - self.cfg.first_check) % self.cfg.every == 0

    def at_epoch_start(self, epoch: int, step: int) -> list[FreezeEvent]:
        """Closes an interval if one ends here and freezes the stages the criterion chooses.

        Returns:
            The new events (their ``optimizer_bytes_freed`` is for the caller to fill in).
        """
        if not self.is_boundary(epoch):
            return []
        self.last_boundary = epoch
        now = self.meter.means()
        events: list[FreezeEvent] = []
        if now and self.previous is not None and epoch >= self.cfg.first_check:
            changes = relative_changes(now, self.previous)
            chosen, cut = choose(changes, self.candidates(), self.cfg)
            self.checks.append({"epoch": epoch, "step": step, "changes": changes, "cut": cut,
                                "candidates": self.candidates(), "froze": chosen})
            events = [self._freeze(stage, epoch, step, changes[stage], cut, now[stage]) for stage in chosen]
        self.previous = {s: v for s, v in now.items() if s not in {e.stage for e in events}} if now else None
        if events:
            self.meter = GradNormMeter(self._groups())
        else:
            self.meter.reset()
        self.events += events
        return events

    def _freeze(self, stage: str, epoch: int, step: int, change: float, cut: float, norm: float) -> FreezeEvent:
        newly = freeze_stage(self.model, self.plan, self.order[stage])
        hashes = fingerprint(self.model, FreezePlan(frozen=newly, frozen_bn=self._stage_bn(stage)))
        return FreezeEvent(step=step, epoch=epoch, stage=stage, change=change, cut=cut, criterion=self.cfg.criterion,
                           grad_norm=norm, tensors=len(hashes), params=_numel(self.model, newly),
                           sha256=combined_sha256(hashes), hashes=hashes)

    def _stage_bn(self, stage: str) -> list[str]:
        return [n for n in self.plan.frozen_bn if stage_members_cover(n, self.order[stage])]

    def frozen_names(self) -> set[str]:
        """Every tensor frozen mid-run (parameters and frozen BatchNorm buffers)."""
        return {name for e in self.events for name in e.hashes}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: events, the last interval, the meter."""
        return {"events": [e.as_dict(hashes=True) for e in self.events], "checks": self.checks,
                "previous": self.previous,
                "last_boundary": self.last_boundary, "meter": self.meter.state_dict()}

    def load_state_dict(self, state: dict) -> list[FreezeEvent]:
        """Re-freezes the stages a checkpoint had frozen, in order, and continues its interval.

        Returns:
            The replayed events (the caller removes their parameters from the optimizer).
        """
        for data in state["events"]:
            freeze_stage(self.model, self.plan, self.order[data["stage"]])
            self.events.append(FreezeEvent(**data))
        self.checks = list(state.get("checks", []))
        self.previous = state["previous"]
        self.last_boundary = int(state["last_boundary"])
        self.meter = GradNormMeter(self._groups())
        self.meter.load_state_dict(state["meter"])
        return list(self.events)

    def summary(self) -> dict:
        """The ``auto_freeze`` section of ``summary.json``."""
        return {"config": self.cfg.model_dump(mode="json"), "events": [e.as_dict() for e in self.events],
                "checks": self.checks, "stages_frozen": [e.stage for e in self.events],
                "params_frozen": sum(e.params for e in self.events),
                "optimizer_bytes_freed": sum(e.optimizer_bytes_freed for e in self.events)}


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
