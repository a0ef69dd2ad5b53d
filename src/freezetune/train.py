"""The fine-tuning recipe: setup -> train -> cleanup.

Usable from Python without the CLI::

    from freezetune.config import load_config
    from freezetune.train import run

    summary = run(load_config("configs/quickstart.yaml", ["train.max_steps=5"]))

Printing goes through a :class:`Reporter`; the default one is silent.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from freezetune import __version__
from freezetune.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, set_rng_state
from freezetune.config import Config, dump_config, load_config
from freezetune.data import Data, EpochSampler, build_data, make_loader
from freezetune.errors import ConfigError, NonFiniteLossError, RunDirError
from freezetune.freeze import (
    FreezePlan,
    apply_freeze,
    combined_sha256,
    fingerprint,
    set_train_mode,
    trainable_parameters,
)
from freezetune.measure import (
    device_description,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    synchronize,
    timing_stats,
)
from freezetune.model import LoadedModel, build_model
from freezetune.params import count_params
from freezetune.runfolder import MetricsLog, prepare_run_dir, read_jsonl, write_json, write_text

FINGERPRINT_NAME = "frozen_sha256.json"


class Reporter:
    """Receives progress events; subclass it to print. Every method is optional."""

    def setup_done(self, run: Run) -> None:  # noqa: D102
        pass

    def train_start(self, total_steps: int, start_step: int) -> None:  # noqa: D102
        pass

    def step(self, record: dict) -> None:  # noqa: D102
        pass

    def validation(self, epoch: int, result: dict) -> None:  # noqa: D102
        pass

    def message(self, text: str) -> None:  # noqa: D102
        pass

    def train_end(self) -> None:  # noqa: D102
        pass


@dataclass
class Run:
    """Everything ``setup`` builds and the later stages use."""

    config: Config
    device: torch.device
    loaded: LoadedModel
    plan: FreezePlan
    optimizer: torch.optim.Optimizer
    data: Data
    run_dir: Path
    params: dict
    frozen_before: dict[str, str]
    progress: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "batch_in_epoch": 0})
    resumed_from_step: int | None = None

    @property
    def model(self) -> nn.Module:
        """The network being trained."""
        return self.loaded.model


@dataclass
class Outcome:
    """What the train stage did."""

    status: str = "completed"  # completed | interrupted | nonfinite
    val: dict | None = None
    error: str | None = None
    first_loss: float | None = None
    last_loss: float | None = None


# --------------------------------------------------------------------------------------------
# setup


def setup(config: Config, resume: bool = False) -> Run:
    """Builds model, freeze plan, optimizer and data, and prepares the run folder.

    Args:
        config: The validated config.
        resume: Continue the run in ``config.output.dir`` from its checkpoint.

    Returns:
        A Run ready for :func:`train`.
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    loaded = build_model(config.model)
    plan = apply_freeze(loaded.model, config.freeze, config.model.name)
    data = build_data(config.data, config.model.num_classes, config.seed)
    run_dir = prepare_run_dir(config.output.dir, config.output.overwrite, resume=resume)
    loaded.model.to(device)
    optimizer = make_optimizer(loaded.model, config)
    run = Run(
        config=config,
        device=device,
        loaded=loaded,
        plan=plan,
        optimizer=optimizer,
        data=data,
        run_dir=run_dir,
        params=count_params(loaded.model),
        frozen_before={},
    )
    if resume:
        _restore(run)
    else:
        run.frozen_before = fingerprint(loaded.model, plan)
        write_json(run_dir / FINGERPRINT_NAME, run.frozen_before)
        write_text(run_dir / "config.yaml", dump_config(config))
    check_optimizer(run.optimizer, run.model)
    return run


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters only."""
    o = config.optim
    return torch.optim.SGD(
        trainable_parameters(model),
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
    )


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Asserts that no frozen parameter is in the optimizer or holds optimizer state."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                raise AssertionError(f"frozen parameter {names.get(id(p), '?')} is in the optimizer")
    for p in optimizer.state:
        if not p.requires_grad:
            raise AssertionError(f"frozen parameter {names.get(id(p), '?')} holds optimizer state")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by optimizer state tensors (SGD momentum buffers)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """Loads a run folder's own config with overrides that may not change what was trained.

    Raises:
        ConfigError: If an override would change the model, freeze spec, data or seed.
        RunDirError: If the folder holds no resumable run.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
        raise RunDirError(f"{run_dir}: no config.yaml and checkpoint.pt to resume from")
    base = load_config(run_dir / "config.yaml")
    config = load_config(run_dir / "config.yaml", overrides)
    for section in ("seed", "model", "freeze", "data", "optim", "output"):
        if getattr(base, section) != getattr(config, section):
            raise ConfigError(
                f"resume {run_dir}: overrides may not change {section} "
                "(only train.* and device may change when resuming)"
            )
    return config


def _restore(run: Run) -> None:
    ckpt = load_checkpoint(run.run_dir / CHECKPOINT_NAME)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    run.progress = {k: int(ckpt[k]) for k in ("step", "epoch", "batch_in_epoch")}
    run.resumed_from_step = run.progress["step"]
    fp = run.run_dir / FINGERPRINT_NAME
    run.frozen_before = json.loads(fp.read_text()) if fp.is_file() else fingerprint(run.model, run.plan)
    # Steps logged after the checkpoint by the interrupted process will be redone.
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.exists():
        kept = [r for r in read_jsonl(metrics) if r["step"] <= run.progress["step"]]
        write_text(metrics, "".join(_json_line(r) for r in kept))


# --------------------------------------------------------------------------------------------
# train


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who really means it.
    """

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


def planned_steps(config: Config, steps_per_epoch: int) -> int:
    """Total optimizer steps the run will take (epochs x batches, capped by max_steps)."""
    total = config.train.epochs * steps_per_epoch
    return min(total, config.train.max_steps) if config.train.max_steps else total


def train(run: Run, reporter: Reporter | None = None) -> Outcome:
    """Runs the training loop with per-step synchronized timing and per-epoch validation."""
    reporter = reporter or Reporter()
    cfg = run.config
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = math.ceil(len(run.data.train) / cfg.data.batch_size)
    total = planned_steps(cfg, steps_per_epoch)
    outcome = Outcome()
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", append=run.resumed_from_step is not None)
    warm_left = cfg.train.warmup_steps
    reset_peak_memory(run.device)
    reporter.train_start(total, run.progress["step"])
    try:
        with StopFlag() as stop:
            while run.progress["step"] < total and run.progress["epoch"] < cfg.train.epochs:
                epoch = run.progress["epoch"]
                sampler = EpochSampler(
                    len(run.data.train), cfg.seed, epoch, run.progress["batch_in_epoch"] * cfg.data.batch_size
                )
                loader = make_loader(
                    run.data.train, cfg.data.batch_size, cfg.data.num_workers, sampler,
                    pin_memory=run.device.type == "cuda",
                )
                set_train_mode(run.model, run.plan, True)
                for batch in loader:
                    loss, seconds = train_step(run, batch, loss_fn)
                    run.progress["step"] += 1
                    run.progress["batch_in_epoch"] += 1
                    if not math.isfinite(loss) and cfg.train.stop_on_nonfinite:
                        outcome.status = "nonfinite"
                        outcome.error = f"loss became {loss} at step {run.progress['step']}"
                        return outcome
                    record = {
                        "step": run.progress["step"],
                        "epoch": epoch,
                        "loss": loss,
                        "step_time_s": seconds,
                        "lr": run.optimizer.param_groups[0]["lr"],
                        "batch_size": int(batch[1].shape[0]),
                        "warmup": warm_left > 0,
                    }
                    warm_left = max(0, warm_left - 1)
                    metrics.write(record)
                    reporter.step(record)
                    outcome.first_loss = loss if outcome.first_loss is None else outcome.first_loss
                    outcome.last_loss = loss
                    if cfg.train.checkpoint_every and run.progress["step"] % cfg.train.checkpoint_every == 0:
                        save_checkpoint(run.run_dir, run.model, run.optimizer, dict(run.progress))
                    if stop.requested or run.progress["step"] >= total:
                        break
                if stop.requested:
                    outcome.status = "interrupted"
                    outcome.error = f"stopped by {stop.requested} after step {run.progress['step']}"
                    break
                if run.progress["batch_in_epoch"] >= steps_per_epoch:
                    run.progress["epoch"] += 1
                    run.progress["batch_in_epoch"] = 0
                if run.data.val is not None:
                    outcome.val = evaluate(run, loss_fn)
                    reporter.validation(epoch, outcome.val)
                save_checkpoint(run.run_dir, run.model, run.optimizer, dict(run.progress))
    finally:
        metrics.close()
        reporter.train_end()
    if outcome.status == "interrupted":
        save_checkpoint(run.run_dir, run.model, run.optimizer, dict(run.progress))
    return outcome


def train_step(run: Run, batch, loss_fn: nn.Module) -> tuple[float, float]:
    """One forward, loss, backward and SGD step, timed with the device synchronized.

    A non-finite loss skips backward and the update, so the weights stay the last good ones.

    Returns:
        The loss value and the step's wall time in seconds.
    """
    synchronize(run.device)
    start = time.perf_counter()
    x = batch[0].to(run.device, non_blocking=True)
    y = batch[1].to(run.device, non_blocking=True)
    loss = loss_fn(run.model(x), y)
    value = loss.item()  # synchronizes; needed anyway to refuse a non-finite update
    if math.isfinite(value) or not run.config.train.stop_on_nonfinite:
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
    synchronize(run.device)
    return value, time.perf_counter() - start


@torch.no_grad()
def evaluate(run: Run, loss_fn: nn.Module) -> dict:
    """One pass over the validation set: mean loss and top-1 accuracy."""
    run.model.eval()
    loader = make_loader(run.data.val, run.config.data.batch_size, run.config.data.num_workers)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(run.device), y.to(run.device)
        logits = run.model(x)
        total_loss += loss_fn(logits, y).item() * y.shape[0]
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
    set_train_mode(run.model, run.plan, True)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "samples": seen}


# --------------------------------------------------------------------------------------------
# cleanup


def cleanup(run: Run, outcome: Outcome) -> dict:
    """Checks freeze integrity and writes ``summary.json``.

    Returns:
        The summary dict (also written to the run folder).
    """
    after = fingerprint(run.model, run.plan)
    changed = sorted(k for k in run.frozen_before if after.get(k) != run.frozen_before[k])
    records = read_jsonl(run.run_dir / "metrics.jsonl")
    timed = [r["step_time_s"] for r in records if not r.get("warmup")]
    losses = [r["loss"] for r in records]
    summary = {
        "status": outcome.status,
        "error": outcome.error,
        "freezetune_version": __version__,
        "device": device_description(run.device),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "model": run.config.model.name,
        "weights": {"source": run.loaded.weights_source, "notice": run.loaded.notice,
                    "head_replaced": run.loaded.head_replaced},
        "params": run.params,
        "freeze": {"batchnorm": run.plan.batchnorm, "frozen_batchnorm_layers": len(run.plan.frozen_bn)},
        "steps": run.progress["step"],
        "epochs_completed": run.progress["epoch"],
        "timing": {**timing_stats(timed, run.config.data.batch_size),
                   "warmup_steps": run.config.train.warmup_steps,
                   "what": "forward+loss+backward+SGD step incl. host-to-device copy, synchronized"},
        "memory": peak_memory(run.device),
        "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "val": {"accuracy": outcome.val["accuracy"] if outcome.val else None,
                "loss": outcome.val["loss"] if outcome.val else None},
        "freeze_integrity": {
            "ok": not changed,
            "tensors_checked": len(after),
            "changed": changed,
            "sha256": combined_sha256(after),
        },
        "run_dir": str(run.run_dir),
    }
    write_json(run.run_dir / "summary.json", summary)
    return summary


def run(config: Config, reporter: Reporter | None = None, resume: bool = False) -> dict:
    """Runs the whole recipe and returns the summary.

    Raises:
        NonFiniteLossError: After writing the summary, if the loss became NaN or infinite.
        FreezeIntegrityError: If a frozen tensor changed (a bug, never expected).
    """
    reporter = reporter or Reporter()
    r = setup(config, resume=resume)
    reporter.setup_done(r)
    outcome = train(r, reporter)
    summary = cleanup(r, outcome)
    if outcome.status == "nonfinite":
        raise NonFiniteLossError(
            f"{outcome.error}; stopped with the last good checkpoint in {r.run_dir / CHECKPOINT_NAME}"
        )
    if not summary["freeze_integrity"]["ok"]:
        raise FreezeIntegrityError(
            f"frozen tensors changed during training: {', '.join(summary['freeze_integrity']['changed'][:5])}"
        )
    return summary


class FreezeIntegrityError(RuntimeError):
    """A frozen tensor changed: a bug in freezetune or in the model, never the user's input."""


def _json_line(record: dict) -> str:
    return json.dumps(record) + "\n"
