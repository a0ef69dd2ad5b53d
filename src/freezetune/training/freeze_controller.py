"""The freeze controller: the one owner of every change to what trains while a run is under way.

Shaped like Lightning's ``BaseFinetuning`` callback: the recipe calls one hook at each epoch start
(:meth:`FreezeController.on_epoch_start`, the unfreeze schedule) and one after each step
(:meth:`FreezeController.on_step`, ``freeze.auto``'s checks, which fall on step counts);
each returns the :class:`FreezeChange` it made, or None. The controller owns:

- the ``freeze.schedule`` phases (gradual unfreezing) and ``freeze.auto`` (adaptive freezing);
- the optimizer's param groups as they follow those changes;
- the ``frozen_before`` hashes the integrity check compares against;
- replaying the changes of a checkpoint, through :meth:`state_dict` / :meth:`load_state_dict`.

It decides nothing about how a step runs: the recipe rebuilds its execution path once whenever a
change comes back. The ``requires_grad`` flips themselves are ``freezing/``'s
(:func:`~freezetune.freezing.schedule.unfreeze_phase`, :func:`~freezetune.freezing.auto.freeze_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from freezetune.config import Config
from freezetune.errors import WeightsError
from freezetune.freezing.auto import AutoFreezer, FreezeEvent
from freezetune.freezing.integrity import changed_tensors, combined_sha256, fingerprint, frozen_state
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import FreezePlan
from freezetune.freezing.schedule import PhaseRecord, phases_due, unfreeze_phase
from freezetune.training import distributed as dist
from freezetune.training.optim import add_unfrozen, check_optimizer, remove_frozen, state_bytes


@dataclass
class FreezeChange:
    """What one hook changed: the phases it applied and the stages it froze, with a line for each."""

    phases: list[PhaseRecord] = field(default_factory=list)
    events: list[FreezeEvent] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def froze(self) -> bool:
        """Whether the frozen prefix grew (the feature cache can then be extended from the old one)."""
        return bool(self.events)


class FreezeController:
    """Every freeze change of one run, in one place.

    Args:
        config: The run's config (``freeze.schedule``, ``freeze.auto``, ``optim``).
        model: The model, already frozen by the initial freeze spec.
        plan: Its freeze plan (updated in place as stages freeze or unfreeze).
        plain_baseline: The optimizer holds every parameter on purpose (``compare``'s plain arm),
            so unfrozen tensors need no new group and optimizer hygiene is not checked.
    """

    def __init__(self, config: Config, model: nn.Module, plan: FreezePlan, plain_baseline: bool = False):
        self.config, self.model, self.plan, self.plain_baseline = config, model, plan, plain_baseline
        self.initial_params = count_params(model)
        self.auto = AutoFreezer(config.freeze.auto, model, plan, config.model.name) if config.freeze.auto else None
        self.phases: list[PhaseRecord] = []
        self.frozen_before: dict[str, str] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def start(self, optimizer: torch.optim.Optimizer) -> dict[str, str]:
        """Hashes every frozen tensor as the run starts; returns the hashes (``frozen_sha256.json``)."""
        self.optimizer = optimizer
        self.frozen_before = fingerprint(self.model, self.plan)
        self.check_optimizer()
        return self.frozen_before

    # ----------------------------------------------------------------------------------------
    # the hooks

    def plan_checks(self, total_steps: int) -> None:
        """Tells ``freeze.auto`` the run's length, which sets its interval (``checks`` per run)."""
        if self.auto is not None:
            self.auto.start(total_steps)

    def on_epoch_start(self, epoch: int) -> FreezeChange | None:
        """Applies the unfreeze phases due by ``epoch``."""
        change = FreezeChange()
        self.apply_phases(phases_due(self.config.freeze.schedule, epoch), change)
        return change if change.phases else None

    def on_step(self, step: int, epoch: int) -> FreezeChange | None:
        """After optimizer step ``step`` (mid-epoch included): the freezes ``freeze.auto`` chooses.

        Calling it twice for one step changes nothing the second time.
        """
        change = FreezeChange()
        self._auto_freeze(epoch, step, change)
        return change if change.events else None

    def apply_phases(self, upto: int, change: FreezeChange | None = None) -> None:
        """Applies phases until ``upto`` are in effect; each proves its tensors never moved first."""
        schedule = self.config.freeze.schedule
        while len(self.phases) < upto:
            phase = schedule[len(self.phases)]
            newly = unfreeze_phase(self.model, self.plan, phase, self.frozen_before)
            groups = []
            if not self.plain_baseline:  # the plain baseline already holds every parameter
                groups = add_unfrozen(self.optimizer, newly, self.config.optim, phase.lr_mult,
                                      f"unfreeze@{phase.epoch}")
            self.check_optimizer()
            record = PhaseRecord.of(phase, newly, groups)
            self.phases.append(record)
            if change is not None:
                trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                change.phases.append(record)
                change.lines.append(f"epoch {phase.epoch}: unfreezing {', '.join(phase.unfreeze)} "
                                    f"({record.params:,} params, lr x{phase.lr_mult}); trainable now {trainable:,}")

    def _auto_freeze(self, epoch: int, step: int, change: FreezeChange) -> None:
        """Freezes the stages that stopped learning: they leave the optimizer and join the integrity check."""
        if self.auto is None:
            return
        events = self.auto.at_step(step, epoch)
        if not events:
            return
        for event in events:
            event.optimizer_bytes_freed = state_bytes(self.optimizer, self.model, event.hashes)
            self.frozen_before.update(event.hashes)
        remove_frozen(self.optimizer)
        self.check_optimizer()
        change.events += events

    def check_optimizer(self) -> None:
        """Proves that no frozen parameter is in the optimizer (unless it is the plain baseline)."""
        if not self.plain_baseline:
            check_optimizer(self.optimizer, self.model)

    def grad_probe(self):
        """The callable a step runs after its update (``freeze.auto``'s meter), or None."""
        return self.auto.meter.observe if self.auto is not None and self.auto.candidates() else None

    # ----------------------------------------------------------------------------------------
    # restarts

    def state_dict(self) -> dict:
        """What a checkpoint keeps: phases in effect and ``freeze.auto``'s state (``RunState`` keys)."""
        return {"phases": len(self.phases), "auto_freeze": self.auto.state_dict() if self.auto is not None else None}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer,
                        frozen_before: dict[str, str] | None) -> list[FreezeEvent]:
        """Replays a checkpoint's freeze changes, so model and optimizer match what was saved.

        Call it before loading the checkpoint's weights and optimizer state.

        Args:
            state: :meth:`state_dict` as the checkpoint saved it.
            optimizer: The run's optimizer, still in its initial groups.
            frozen_before: The run's ``frozen_sha256.json``, or None to hash the model now.

        Returns:
            The replayed ``freeze.auto`` events, for :meth:`check_replayed`.
        """
        self.optimizer = optimizer
        self.frozen_before = frozen_before if frozen_before is not None else fingerprint(self.model, self.plan)
        self.apply_phases(int(state.get("phases", 0)))
        if self.auto is None or not state.get("auto_freeze"):
            return []
        replayed = self.auto.load_state_dict(state["auto_freeze"])
        remove_frozen(self.optimizer)
        return replayed

    def check_replayed(self, replayed: list[FreezeEvent], path: Path) -> None:
        """Proves the restored weights of stages frozen mid-run are the ones hashed when they froze.

        Raises:
            WeightsError: If a tensor of such a stage differs from its hash.
        """
        current = fingerprint(self.model, self.plan) if replayed else {}
        for event in replayed:
            moved = sorted(k for k, h in event.hashes.items() if current.get(k) != h)
            if moved:
                raise WeightsError(f"{path}: {event.stage} (frozen at step {event.step}) does not match "
                                   f"its hash from then: {', '.join(moved[:3])}")
            self.frozen_before.update(event.hashes)
        self.check_optimizer()

    # ----------------------------------------------------------------------------------------
    # what the run reports

    def integrity(self, info: dist.DistInfo) -> dict:
        """The freeze-integrity check: every still-frozen tensor against its hash from when it froze.

        The one check every run ends with (on every rank). Tensors unfrozen by a phase were
        checked when they were unfrozen.
        """
        after = fingerprint(self.model, self.plan)
        changed = changed_tensors(self.frozen_before, after)
        ranks_ok = dist.gather(not changed, info)
        return {
            "ok": all(ranks_ok),
            "tensors_checked": len(after),
            "changed": changed,
            "sha256": combined_sha256(after),
            "checked_when_unfrozen": sum(p.tensors for p in self.phases),
            "frozen_mid_run": sum(e.tensors for e in self.auto.events) if self.auto else 0,
            "ranks_ok": ranks_ok,
        }

    def base_plan(self) -> FreezePlan:
        """The plan as the trainable-only checkpoint sees it.

        Stages frozen mid-run changed since the start, so they are saved with the trainable
        tensors, not left to the base.
        """
        if self.auto is None or not self.auto.events:
            return self.plan
        mid_run = self.auto.frozen_names()
        plan = self.plan
        return FreezePlan(trainable=plan.trainable + [n for n in plan.frozen if n in mid_run],
                          frozen=[n for n in plan.frozen if n not in mid_run],
                          frozen_bn=[n for n in plan.frozen_bn if not any(k.startswith(n + ".") for k in mid_run)],
                          batchnorm=plan.batchnorm, adapt=plan.adapt)

    def base_sha256(self) -> str:
        """The combined hash of the trainable checkpoint's base: what :meth:`base_plan` freezes, as it froze."""
        frozen_now = set(frozen_state(self.model, self.base_plan()))
        return combined_sha256({k: h for k, h in self.frozen_before.items() if k in frozen_now})

    def logged_event_kept(self, row: dict) -> bool:
        """Whether an event row of an interrupted process is one the checkpoint holds (else it recurs)."""
        if row.get("event") == "auto_freeze":
            return self.auto is not None and row.get("stage") in {e.stage for e in self.auto.events}
        if row.get("event") == "accuracy_drop":
            return self.auto is not None and row.get("epoch") in {d.epoch for d in self.auto.drops}
        return True
