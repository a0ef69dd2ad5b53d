"""The fine-tuning recipe: setup -> train -> cleanup.

Usable from Python without the CLI::

    from freezetune.config import load_config
    from freezetune.training.recipe import run

    summary = run(load_config("configs/quickstart.yaml", ["train.max_steps=5"]))

Printing goes through a :class:`Reporter`; the default one is silent.
"""

from __future__ import annotations

import gc
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
from freezetune.config import Config, dump_config, load_config
from freezetune.errors import ConfigError, NonFiniteLossError, RunDirError, WeightsError
from freezetune.export import checkpoint_sizes, save_trainable
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import (
    FreezePlan,
    apply_freeze,
    combined_sha256,
    fingerprint,
    frozen_state,
    set_train_mode,
    unfreeze,
)
from freezetune.measure.timing import (
    device_description,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    synchronize,
    timing_stats,
)
from freezetune.models.weights import LoadedModel, build_model
from freezetune.speed.feature_cache import FeatureCache, IndexedDataset, assess, cache_key
from freezetune.speed.precision import autocast, check_precision, grad_scaler
from freezetune.speed.prefix import SplitForward
from freezetune.training import distributed as dist
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, set_rng_state
from freezetune.training.data import Data, EpochSampler, build_data, make_loader
from freezetune.training.optim import add_unfrozen, build_optimizer, check_optimizer, optimizer_state_bytes, set_lr
from freezetune.training.run_dir import (
    MetricsLog,
    prepare_run_dir,
    read_jsonl,
    remove_stale_temps,
    write_json,
    write_text,
)

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
    progress: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "batch_in_epoch": 0, "phases": 0})
    resumed_from_step: int | None = None
    saved_step: int | None = None  # step of the newest checkpoint on disk
    split: SplitForward | None = None
    cache: FeatureCache | None = None
    speed: dict = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None
    restored_scaler: dict | None = None  # GradScaler state from the checkpoint being resumed
    compiled: nn.Module | None = None
    epoch_times: list[dict] = field(default_factory=list)
    dist: dist.DistInfo = field(default_factory=dist.DistInfo)
    ddp: nn.Module | None = None
    step_times: list[float] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        """The network being trained."""
        return self.loaded.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images, through the fastest correct path chosen at setup."""
        if self.split is not None:
            return self.split(x)
        return (self.compiled or self.model)(x)

    def logits(self, x: torch.Tensor, y: torch.Tensor, indices, kind: str) -> torch.Tensor:
        """Logits for one training batch (images or cached features), through DDP when distributed."""
        if self.ddp is not None:
            return self.ddp(x, y, indices, kind)
        return _batch_logits(self, x, y, indices, kind)


def _batch_logits(run: Run, x: torch.Tensor, y: torch.Tensor, indices, kind: str) -> torch.Tensor:
    if kind == "features":
        return run.split.head(x)
    if kind == "images+cache":
        h = run.split.features(x)
        run.cache.put(indices, h, y)
        return run.split.head(h)
    return run.forward(x)


class _DDPForward(nn.Module):
    """What DDP wraps: the model (so DDP sees the trainable parameters) and the batch-to-logits path.

    The folded prefix copy is not a submodule, so DDP never touches it.
    """

    def __init__(self, run: Run):
        super().__init__()
        self.model = run.model
        self._run = [run]  # a list, so the Run is not registered as a submodule

    def forward(self, x, y, indices, kind):  # noqa: D102
        return _batch_logits(self._run[0], x, y, indices, kind)


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
    info = dist.from_env()
    device = dist.init(info, config.device) if info.enabled else resolve_device(config.device)
    torch.manual_seed(config.seed)
    loaded = build_model(config.model)
    plan = apply_freeze(loaded.model, config.freeze, config.model.name)
    data = build_data(config.data, config.model.num_classes, config.seed)
    if info.is_main:
        run_dir = prepare_run_dir(config.output.dir, config.output.overwrite, resume=resume)
    dist.barrier(info)
    run_dir = Path(config.output.dir)
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
        dist=info,
    )
    if resume:
        _restore(run)
        _check_work_left(run)
        if info.is_main:
            remove_stale_temps(run_dir)  # left by a process killed while saving
            _truncate_metrics(run)
            # Record the train.* overrides, so that resuming again continues with them.
            write_text(run_dir / "config.yaml", dump_config(config))
    else:
        run.frozen_before = fingerprint(loaded.model, plan)
        if info.is_main:
            write_json(run_dir / FINGERPRINT_NAME, run.frozen_before)
            write_text(run_dir / "config.yaml", dump_config(config))
    dist.barrier(info)
    check_optimizer(run.optimizer, run.model)
    _setup_speed(run)
    return run


def _setup_speed(run: Run) -> None:
    """Chooses the execution path: frozen-prefix split, BatchNorm folding, cache, precision, layout."""
    cfg, model = run.config, run.model
    check_precision(cfg.train.precision, run.device)
    if run.scaler is None:  # created once: its loss scale must survive a rebuild after unfreezing
        run.scaler = grad_scaler(cfg.train.precision, run.device)
        if run.scaler is not None and run.restored_scaler:
            # A resumed fp16 run continues with the loss scale it had reached, instead of
            # re-learning it from 65536 through a burst of skipped (overflowing) steps.
            run.scaler.load_state_dict(run.restored_scaler)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    prefix, bn_frozen, decision = assess(model, run.plan, cfg)
    if prefix and (cfg.train.fold_batchnorm or decision.enabled):
        # channels-last for the folded prefix is a measured CPU win (see SplitForward); on CUDA
        # the prefix follows train.channels_last like the rest of the model.
        run.split = SplitForward(model, cfg.model.name, prefix, fold=bn_frozen and cfg.train.fold_batchnorm,
                                 prefix_channels_last=run.device.type == "cpu" or cfg.train.channels_last,
                                 suffix_channels_last=cfg.train.channels_last)
    if decision.enabled:
        key = cache_key(model, run.plan, cfg, run.data.train)
        run.cache = FeatureCache(len(run.data.train), run.run_dir, key, cfg.train.feature_cache_max_bytes,
                                 device=run.device)
    if cfg.train.compile:
        if run.split is not None:
            run.split.prefix = torch.compile(run.split.prefix)
            run.split.head = torch.compile(run.split.head)
        else:
            run.compiled = torch.compile(model)
    run.speed = {
        "frozen_prefix": prefix,
        "prefix_without_autograd": run.split is not None,
        "folded_batchnorm": bool(run.split and run.split.folded),
        "prefix_channels_last": bool(run.split and run.split.prefix_format is not None),
        "feature_cache": {"enabled": decision.enabled, "reason": decision.reason},
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
    }
    # DDP registers the parameters that require grad when it is built, so it is (re)built here,
    # after every change of the freeze state.
    run.ddp = dist.wrap(_DDPForward(run), run.dist, run.device) if run.dist.enabled else None


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters only, grouped by ``optim.param_groups``."""
    return build_optimizer(model, config.optim)


def apply_phases(run: Run, upto: int, reporter: Reporter | None = None) -> None:
    """Applies ``freeze.schedule`` phases until ``upto`` of them are in effect (gradual unfreezing).

    Each phase unfreezes its patterns, checks that those tensors were still bit-identical to the
    start (they were frozen until now), adds them to the optimizer as new groups with the phase's
    ``lr_mult``, re-checks optimizer hygiene and rebuilds the execution path (prefix, cache, DDP).
    """
    schedule = run.config.freeze.schedule
    while len(run.phases) < upto:
        phase = schedule[len(run.phases)]
        newly = unfreeze(run.model, run.plan, phase.unfreeze)
        current = fingerprint(run.model, FreezePlan(frozen=[n for n, _ in newly]))
        moved = sorted(n for n, h in current.items() if run.frozen_before.get(n, h) != h)
        if moved:
            raise FreezeIntegrityError(f"tensors changed while frozen, before epoch {phase.epoch}: {moved[:5]}")
        groups = add_unfrozen(run.optimizer, newly, run.config.optim, phase.lr_mult, f"unfreeze@{phase.epoch}")
        check_optimizer(run.optimizer, run.model)
        info = {"epoch": phase.epoch, "unfreeze": phase.unfreeze, "tensors": len(newly),
                "params": sum(p.numel() for _, p in newly), "lr_mult": phase.lr_mult, "groups": groups,
                "unchanged_while_frozen": True}
        run.phases.append(info)
        run.progress["phases"] = len(run.phases)
        if run.split is not None or run.cache is not None or run.ddp is not None:
            _setup_speed(run)
        if reporter is not None:
            trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            reporter.message(
                f"epoch {phase.epoch}: unfreezing {', '.join(phase.unfreeze)} ({info['params']:,} params, "
                f"lr x{phase.lr_mult}); trainable now {trainable:,}"
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
    path = run.run_dir / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    fp = run.run_dir / FINGERPRINT_NAME
    run.frozen_before = json.loads(fp.read_text()) if fp.is_file() else fingerprint(run.model, run.plan)
    try:
        # Re-apply the unfreeze phases the run had reached first, so the freeze state and the
        # optimizer's param groups are exactly those the checkpoint was saved with.
        apply_phases(run, int(ckpt.get("phases", 0)))
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.progress = {k: int(ckpt.get(k, 0)) for k in ("step", "epoch", "batch_in_epoch", "phases")}
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{path}: checkpoint does not fit this run's model ({first})") from None
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    run.restored_scaler = ckpt.get("scaler")
    run.resumed_from_step = run.saved_step = run.progress["step"]


def _check_work_left(run: Run) -> None:
    """Refuses to "resume" a run that already completed (it would only rewrite its summary)."""
    p, cfg = run.progress, run.config
    total = planned_steps(cfg, steps_per_epoch(run))
    if p["step"] < total and p["epoch"] < cfg.train.epochs:
        return
    try:
        status = json.loads((run.run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None  # killed after its last checkpoint: resuming writes the missing summary
    if status == "completed":
        raise RunDirError(
            f"{run.run_dir}: run already finished after {p['step']} steps; "
            "to train longer, resume with a larger train.max_steps or train.epochs"
        )


def _truncate_metrics(run: Run) -> None:
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


def steps_per_epoch(run: Run) -> int:
    """Optimizer steps in one pass over (this rank's share of) the training set."""
    return math.ceil(len(run.data.train) // run.dist.world_size / run.config.data.batch_size)


def planned_steps(config: Config, steps_per_epoch: int) -> int:
    """Total optimizer steps the run will take (epochs x batches, capped by max_steps)."""
    total = config.train.epochs * steps_per_epoch
    return min(total, config.train.max_steps) if config.train.max_steps else total


def train(run: Run, reporter: Reporter | None = None) -> Outcome:
    """Runs the training loop with per-step synchronized timing and per-epoch validation."""
    reporter = reporter or Reporter()
    cfg = run.config
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = steps_per_epoch(run)
    total = planned_steps(cfg, per_epoch)
    outcome = Outcome()
    metrics = MetricsLog(
        run.run_dir / "metrics.jsonl" if run.dist.is_main else None, append=run.resumed_from_step is not None
    )
    warm_left = cfg.train.warmup_steps
    reset_peak_memory(run.device)
    reporter.train_start(total, run.progress["step"])
    if cfg.train.feature_cache != "off":
        reporter.message(run.speed["feature_cache"]["reason"])
    try:
        with StopFlag() as stop:
            while run.progress["step"] < total and run.progress["epoch"] < cfg.train.epochs:
                if stop.requested:  # arrived during validation or a checkpoint save
                    break
                epoch = run.progress["epoch"]
                apply_phases(run, sum(p.epoch <= epoch for p in cfg.freeze.schedule), reporter)
                set_train_mode(run.model, run.plan, True)
                epoch_start, epoch_steps = time.perf_counter(), 0
                cached = run.cache is not None and run.cache.complete
                for batch in epoch_batches(run, epoch):
                    set_lr(run.optimizer, cfg.optim, run.progress["step"], total)
                    loss, seconds = train_step(run, batch, loss_fn)
                    run.step_times.append(seconds)
                    loss = dist.mean(loss, run.dist, run.device)  # what a single process would see
                    run.progress["step"] += 1
                    run.progress["batch_in_epoch"] += 1
                    epoch_steps += 1
                    if not math.isfinite(loss) and cfg.train.stop_on_nonfinite:
                        outcome.status = "nonfinite"
                        outcome.error = f"loss became {loss} at step {run.progress['step']}"
                        # train_step skipped the update: the step did not happen.
                        run.progress["step"] -= 1
                        run.progress["batch_in_epoch"] -= 1
                        return outcome
                    record = {
                        "step": run.progress["step"],
                        "epoch": epoch,
                        "loss": loss,
                        "step_time_s": seconds,
                        "lr": run.optimizer.param_groups[0]["lr"],
                        "batch_size": int(batch[1].shape[0]),
                        "warmup": warm_left > 0,
                        "cached": cached,
                    }
                    warm_left = max(0, warm_left - 1)
                    metrics.write(record)
                    reporter.step(record)
                    outcome.first_loss = loss if outcome.first_loss is None else outcome.first_loss
                    outcome.last_loss = loss
                    if cfg.train.checkpoint_every and run.progress["step"] % cfg.train.checkpoint_every == 0:
                        save(run)
                    stop_now = dist.any_true(stop.requested is not None, run.dist, run.device)
                    if stop_now and not stop.requested:
                        stop.requested = "another rank's signal"
                    if stop_now or run.progress["step"] >= total:
                        break
                synchronize(run.device)
                run.epoch_times.append({"epoch": epoch, "seconds": time.perf_counter() - epoch_start,
                                        "steps": epoch_steps, "cached": cached})
                if stop.requested and run.progress["step"] < total:
                    break  # a signal during the final step lets the run complete instead
                if run.progress["batch_in_epoch"] >= per_epoch:
                    run.progress["epoch"] += 1
                    run.progress["batch_in_epoch"] = 0
                if run.data.val is not None:
                    outcome.val = evaluate(run, loss_fn)
                    reporter.validation(epoch, outcome.val)
                save(run)
            work_left = run.progress["step"] < total and run.progress["epoch"] < cfg.train.epochs
            if stop.requested and work_left:
                outcome.status = "interrupted"
                outcome.error = f"stopped by {stop.requested} after step {run.progress['step']}"
    finally:
        metrics.close()
        reporter.train_end()
    if outcome.status == "interrupted":
        save(run)
    return outcome


def save(run: Run) -> None:
    """Writes the trainable-only checkpoint, then ``checkpoint.pt``; each atomically.

    ``checkpoint.pt`` goes last, so whenever it holds step N the trainable checkpoint holds step N
    or (if the process died in between) N+1.
    """
    if not run.dist.is_main:
        return  # every rank holds the same weights; rank 0 writes them
    # The base is what is frozen now, hashed as it was before training (a layer unfrozen
    # mid-run is saved with the trainable tensors instead).
    frozen_now = set(frozen_state(run.model, run.plan))
    save_trainable(
        run.run_dir, run.model, run.plan,
        base=combined_sha256({k: h for k, h in run.frozen_before.items() if k in frozen_now}),
        step=run.progress["step"],
        model_name=run.config.model.name,
        num_classes=run.config.model.num_classes,
        weights_source=run.loaded.weights_source,
        seed=run.config.seed,
    )
    save_checkpoint(run.run_dir, run.model, run.optimizer, dict(run.progress), run.scaler)
    run.saved_step = run.progress["step"]


def epoch_batches(run: Run, epoch: int):
    """Yields the epoch's remaining batches as ``(inputs, labels, indices_or_None, kind)``.

    ``kind`` is ``images``, ``images+cache`` (compute the prefix and store it) or ``features``
    (prefix outputs read from the cache). The order is the same in every case: EpochSampler's.
    """
    cfg = run.config
    bs = cfg.data.batch_size
    sampler = EpochSampler(len(run.data.train), cfg.seed, epoch, run.progress["batch_in_epoch"] * bs,
                           rank=run.dist.rank, world_size=run.dist.world_size)
    if run.cache is not None and run.cache.complete:
        order = torch.tensor(list(sampler), dtype=torch.long)
        for chunk in order.split(bs):
            features, labels = run.cache.get(chunk)
            yield features, labels, chunk, "features"
        return
    dataset = IndexedDataset(run.data.train) if run.cache is not None else run.data.train
    loader = make_loader(dataset, bs, cfg.data.num_workers, sampler, pin_memory=run.device.type == "cuda",
                         seed=cfg.seed * 1_000_003 + epoch)
    for batch in loader:
        if run.cache is not None:
            yield batch[0], batch[1], batch[2], "images+cache"
        else:
            yield batch[0], batch[1], None, "images"


def _memory_format(run: Run) -> torch.memory_format:
    """The layout images are moved to the device in (``train.channels_last``)."""
    return torch.channels_last if run.config.train.channels_last else torch.contiguous_format


def fill_cache(run: Run) -> float:
    """Stores the frozen prefix's output for every training sample without training; returns seconds.

    Training fills the feature cache during its first epoch. A comparison fills it up front
    instead, so that each of its timed steps is a later-epoch step; the time it took is the price
    the first epoch pays.

    Raises:
        ValueError: If this run has no feature cache.
    """
    if run.cache is None:
        raise ValueError("this run has no feature cache (train.feature_cache is off or not possible)")
    memory_format = _memory_format(run)
    synchronize(run.device)
    start = time.perf_counter()
    for inputs, labels, indices, _ in epoch_batches(run, 0):
        x = inputs.to(run.device, non_blocking=True, memory_format=memory_format)
        with autocast(run.config.train.precision, run.device):
            run.cache.put(indices, run.split.features(x), labels)
    synchronize(run.device)
    return time.perf_counter() - start


def train_step(run: Run, batch, loss_fn: nn.Module) -> tuple[float, float]:
    """One forward, loss, backward and SGD step, timed with the device synchronized.

    A non-finite loss skips backward and the update, so the weights stay the last good ones.

    Returns:
        The loss value and the step's wall time in seconds.
    """
    inputs, labels, indices, kind = batch
    synchronize(run.device)
    start = time.perf_counter()
    memory_format = _memory_format(run)
    x = inputs.to(run.device, non_blocking=True, memory_format=memory_format)
    y = labels.to(run.device, non_blocking=True)
    with autocast(run.config.train.precision, run.device):
        loss = loss_fn(run.logits(x, y, indices, kind).float(), y)
    value = loss.item()  # synchronizes; needed anyway to refuse a non-finite update
    if math.isfinite(value) or not run.config.train.stop_on_nonfinite:
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
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
    memory_format = _memory_format(run)
    for x, y in loader:
        x, y = x.to(run.device, memory_format=memory_format), y.to(run.device)
        with autocast(run.config.train.precision, run.device):
            logits = run.model(x).float()
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
    integrity = freeze_integrity(run)
    bs = run.config.data.batch_size
    per_rank = dist.gather(timing_stats(run.step_times[run.config.train.warmup_steps:], bs), run.dist)
    if not run.dist.is_main:
        return {"rank": run.dist.rank, "freeze_integrity": integrity}
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
        "timing_by_path": {
            "uncached": timing_stats([r["step_time_s"] for r in records
                                      if not r.get("warmup") and not r.get("cached")], run.config.data.batch_size),
            "cached": timing_stats([r["step_time_s"] for r in records
                                    if not r.get("warmup") and r.get("cached")], run.config.data.batch_size),
        },
        "epochs": run.epoch_times,
        "speed": {**run.speed, "feature_cache": {
            **run.speed.get("feature_cache", {}),
            "bytes": run.cache.nbytes if run.cache else 0,
            "on_disk": bool(run.cache and run.cache.on_disk),
        }},
        "memory": peak_memory(run.device),
        "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
        "checkpoint": {**checkpoint_sizes(run.run_dir), "step": run.saved_step},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "val": {"accuracy": outcome.val["accuracy"] if outcome.val else None,
                "loss": outcome.val["loss"] if outcome.val else None},
        "freeze_integrity": integrity,
        "schedule": run.phases,
        "optimizer": {"groups": [{"name": g.get("name"), "lr": g["lr"], "lr_mult": g.get("lr_mult", 1.0),
                                  "params": sum(p.numel() for p in g["params"])} for g in run.optimizer.param_groups],
                      "scheduler": run.config.optim.scheduler},
        "distributed": {"world_size": run.dist.world_size, "timing_per_rank": per_rank},
        "run_dir": str(run.run_dir),
    }
    write_json(run.run_dir / "summary.json", summary)
    return summary


def freeze_integrity(run: Run) -> dict:
    """Compares every still-frozen tensor with its hash from the start of the run (on every rank).

    Tensors unfrozen by a ``freeze.schedule`` phase were checked when they were unfrozen.
    """
    after = fingerprint(run.model, run.plan)
    changed = sorted(k for k, h in after.items() if run.frozen_before.get(k) != h)
    ranks_ok = dist.gather(not changed, run.dist)
    return {
        "ok": all(ranks_ok),
        "tensors_checked": len(after),
        "changed": changed,
        "sha256": combined_sha256(after),
        "checked_when_unfrozen": sum(p["tensors"] for p in run.phases),
        "ranks_ok": ranks_ok,
    }


def run(config: Config, reporter: Reporter | None = None, resume: bool = False) -> dict:
    """Runs the whole recipe and returns the summary.

    Raises:
        NonFiniteLossError: After writing the summary, if the loss became NaN or infinite.
        FreezeIntegrityError: If a frozen tensor changed (a bug, never expected).
    """
    r = setup(config, resume=resume)
    reporter = reporter if reporter is not None and r.dist.is_main else Reporter()
    try:
        reporter.setup_done(r)
        outcome = train(r, reporter)
        summary = cleanup(r, outcome)
    finally:
        # Drop the DDP wrapper (and any replaced by unfreezing) before the process group goes:
        # a reducer destroyed after its group can abort the process at exit.
        r.ddp = None
        gc.collect()
        dist.shutdown(r.dist)
    if outcome.status == "nonfinite":
        if r.saved_step is None:
            kept = "no checkpoint had been saved yet (train.checkpoint_every saves every N steps)"
        else:
            kept = f"the last good checkpoint (step {r.saved_step}) is kept in {r.run_dir / CHECKPOINT_NAME}"
        raise NonFiniteLossError(f"{outcome.error}; stopped, {kept}")
    if not summary["freeze_integrity"]["ok"]:
        raise FreezeIntegrityError(
            f"frozen tensors changed during training: {', '.join(summary['freeze_integrity']['changed'][:5])}"
        )
    return summary


class FreezeIntegrityError(RuntimeError):
    """A frozen tensor changed: a bug in freezetune or in the model, never the user's input."""


def _json_line(record: dict) -> str:
    return json.dumps(record) + "\n"
