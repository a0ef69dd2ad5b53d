"""One training step, one validation pass, and the execution path they run through.

:class:`Engine` is the model side of a step: the model, the frozen-prefix split and feature cache
chosen by :func:`freezetune.speed.execution.plan_execution`, the optimizer, precision and DDP. A
:class:`Batch` says where its inputs come from (images, images whose prefix output is cached as it
is computed, or cached prefix features), so the step never guesses from strings.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from freezetune.freezing.plan import FreezePlan, set_train_mode
from freezetune.measure.timing import synchronize
from freezetune.speed.execution import ExecutionPlan
from freezetune.speed.feature_cache import FeatureCache
from freezetune.speed.precision import autocast
from freezetune.speed.prefix import SplitForward
from freezetune.training.data import make_loader


class BatchSource(enum.Enum):
    """Where a batch's inputs come from."""

    IMAGES = "images"
    IMAGES_FILL_CACHE = "images+cache"  # images; their prefix output is stored in the cache
    FEATURES = "features"  # prefix outputs read from the feature cache


@dataclass(frozen=True)
class Batch:
    """One training batch.

    Attributes:
        inputs: Images, or cached prefix features when ``source`` is FEATURES.
        labels: Class indices.
        indices: Dataset indices of the samples (needed by the feature cache), else None.
        source: Where ``inputs`` come from.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None
    source: BatchSource

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return int(self.labels.shape[0])


@dataclass
class Engine:
    """Everything a step needs besides the batch; rebuilt when the freeze state changes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    stop_on_nonfinite: bool = True
    split: SplitForward | None = None
    cache: FeatureCache | None = None
    compiled: nn.Module | None = None
    ddp: nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None
    # Validation features of a frozen, cached prefix: (features, labels) per batch, kept after the
    # first validation pass when they fit (see evaluate); None until then, [] when they did not fit.
    val_features: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    val_features_max_bytes: int = 0
    # Called after every update (freeze.auto's gradient-norm meter); part of the timed step.
    grad_probe: Callable[[], None] | None = None
    # The decision this engine was built from (speed.execution.plan_execution).
    execution: ExecutionPlan | None = None

    def speed(self) -> dict:
        """The execution path as the ``speed`` section of ``summary.json``, with the folded copy's bytes."""
        if self.execution is None:
            return {}
        return {**self.execution.as_dict(), "folded_prefix_bytes": self.split.folded_bytes if self.split else 0}

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout images are moved to the device in (``train.channels_last``)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images, through the fastest correct path."""
        if self.split is not None:
            return self.split(x)
        return (self.compiled or self.model)(x)

    def logits(self, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Logits for one training batch, through DDP when distributed."""
        if self.ddp is not None:
            return self.ddp(x, y, batch.indices, batch.source)
        return self.batch_logits(x, y, batch.indices, batch.source)

    def batch_logits(self, x: torch.Tensor, y: torch.Tensor, indices, source: BatchSource) -> torch.Tensor:
        """Logits from images or cached features; fills the cache on the way when asked to."""
        if source is BatchSource.FEATURES:
            return self.split.head(x)
        if source is BatchSource.IMAGES_FILL_CACHE:
            h = self.split.features(x)
            self.cache.put(indices, h, y)
            return self.split.head(h)
        return self.forward(x)


class DDPForward(nn.Module):
    """What DDP wraps: the model (so DDP sees the trainable parameters) and the batch-to-logits path.

    The folded prefix copy is not a submodule, so DDP never touches it.
    """

    def __init__(self, engine: Engine):
        super().__init__()
        self.model = engine.model
        self._engine = [engine]  # a list, so the Engine is not registered as a submodule

    def forward(self, x, y, indices, source):  # noqa: D102
        return self._engine[0].batch_logits(x, y, indices, source)


def train_step(engine: Engine, batch: Batch, loss_fn: nn.Module) -> tuple[float, float]:
    """One forward, loss, backward and SGD step, timed with the device synchronized.

    A non-finite loss skips backward and the update (with ``train.stop_on_nonfinite``), so the
    weights stay the last good ones.

    Returns:
        The loss value and the step's wall time in seconds.
    """
    synchronize(engine.device)
    start = time.perf_counter()
    x = batch.inputs.to(engine.device, non_blocking=True, memory_format=engine.memory_format)
    y = batch.labels.to(engine.device, non_blocking=True)
    with autocast(engine.precision, engine.device):
        loss = loss_fn(engine.logits(x, y, batch).float(), y)
    value = loss.item()  # synchronizes; needed anyway to refuse a non-finite update
    if math.isfinite(value) or not engine.stop_on_nonfinite:
        engine.optimizer.zero_grad(set_to_none=True)
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        if engine.grad_probe is not None:
            engine.grad_probe()
    synchronize(engine.device)
    return value, time.perf_counter() - start


@torch.no_grad()
def evaluate(engine: Engine, plan: FreezePlan, data: Dataset, batch_size: int, num_workers: int,
             loss_fn: nn.Module) -> dict:
    """One pass over the validation set: mean loss and top-1 accuracy; leaves the model training.

    Where the engine caches the frozen prefix's training features (so that prefix is fixed and
    deterministic), validation caches it too: the first pass keeps each batch's prefix output,
    within ``val_features_max_bytes``, and later passes run only the trainable suffix on them.
    """
    engine.model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for h, y in _val_batches(engine, data, batch_size, num_workers):
        with autocast(engine.precision, engine.device):
            logits = (engine.split.head(h) if engine.split is not None and engine.cache is not None
                      else engine.model(h)).float()
        total_loss += loss_fn(logits, y).item() * y.shape[0]
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
    set_train_mode(engine.model, plan, True)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "samples": seen}


def _val_batches(engine: Engine, data: Dataset, batch_size: int, num_workers: int):
    """Validation inputs: images, or prefix features (computed once, then read back) for cached engines."""
    if engine.val_features:
        yield from engine.val_features
        return
    cached = engine.split is not None and engine.cache is not None
    # Within the feature-cache budget that the training cache leaves (none if it spilled to disk).
    limit = 0 if not cached or engine.cache.on_disk else engine.val_features_max_bytes - engine.cache.nbytes
    kept, size = [], 0
    for x, y in make_loader(data, batch_size, num_workers):
        x, y = x.to(engine.device, memory_format=engine.memory_format), y.to(engine.device)
        if not cached:
            yield x, y
            continue
        with autocast(engine.precision, engine.device):
            h = engine.split.features(x)
        size += h.numel() * h.element_size()
        if kept is not None and size <= limit:
            kept.append((h, y))
        else:
            kept = None  # too big to keep: every pass computes the prefix
        yield h, y
    if cached:
        engine.val_features = kept or []


def extend_cache(old: Engine, new: Engine, batch_size: int) -> bool:
    """Fills ``new``'s feature cache from ``old``'s, through only the stages that froze in between.

    When the frozen prefix grows mid-run (``freeze.auto``), the old prefix's cached output is the
    input of the newly frozen stages. Running just those over the cache fills the new cache
    without reading an image or recomputing the old prefix, so the epoch that follows trains from
    cached features at once instead of filling the cache from images first.

    Returns:
        Whether it did: the old cache must be complete and in memory (a memory-mapped cache
        shares its file with the new one), and its prefix must be the start of the new one.
    """
    src, dst = old.cache, new.cache
    if src is None or dst is None or src.on_disk or not src.complete or old.split is None or new.split is None:
        return False
    done = old.split.names
    if not new.split.continues(done) or len(new.split.names) == len(done):
        return False
    # Not timed here: the epoch it starts times it, synchronized (Recipe._epoch).
    for chunk in torch.arange(src.size).split(batch_size):
        h, labels = src.get(chunk)
        with autocast(new.precision, new.device):
            dst.put(chunk, new.split.features_after(h.to(new.device), done), labels)
    return True


def fill_cache(engine: Engine, batches: Iterable[Batch]) -> float:
    """Stores the frozen prefix's output for every batch without training; returns seconds.

    Raises:
        ValueError: If the engine has no feature cache.
    """
    if engine.cache is None:
        raise ValueError("this run has no feature cache (train.feature_cache is off or not possible)")
    synchronize(engine.device)
    start = time.perf_counter()
    for batch in batches:
        x = batch.inputs.to(engine.device, non_blocking=True, memory_format=engine.memory_format)
        with autocast(engine.precision, engine.device):
            engine.cache.put(batch.indices, engine.split.features(x), batch.labels)
    synchronize(engine.device)
    return time.perf_counter() - start
