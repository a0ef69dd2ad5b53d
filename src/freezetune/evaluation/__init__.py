"""``freezetune evaluate``: a trained run's model on its own split or any ImageFolder with its classes.

The model comes from the run folder's ``checkpoint.pt`` (with its base file), its trainable-only
checkpoint merged with the rebuilt base (:mod:`freezetune.export`), or a ``.safetensors``/``.pt``
weights file loaded into the run's architecture. It runs exactly as the run's own validation
did (:func:`freezetune.training.step.evaluate`): every module in eval mode, the run's precision,
memory layout and batch size, the samples in dataset order. So on the run's own validation split
its top-1 accuracy equals ``summary.json``'s ``val.accuracy``, count for count.

The counts come from torchmetrics (the ``eval`` extra): a confusion matrix for top-1 and
per-class accuracy and ``MulticlassStatScores`` for top-k, both accumulated on the device as
integers. The loss is summed per class from per-sample cross-entropy. Which weights are loaded,
and how strictly, is :mod:`freezetune.evaluation.weights`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from freezetune import __version__
from freezetune.atomic import write_json
from freezetune.config import Config
from freezetune.errors import DataError, MissingExtraError, RunDirError
from freezetune.evaluation.weights import Weights, few, load_weights
from freezetune.lock import hold
from freezetune.measure.device import device_description, resolve_device
from freezetune.records import Record
from freezetune.speed.precision import autocast
from freezetune.speed.prefix import SplitForward
from freezetune.training.data import CheckedImageFolder, build_data, make_loader, worker_count
from freezetune.training.data import _transform as data_transform  # the run's own eval transform, not a copy
from freezetune.training.run_dir import RunDir

__all__ = ["EVAL_NAME", "EVAL_SCHEMA_VERSION", "EvalResult", "Weights", "check_out", "class_difference",
           "evaluate_run", "load_weights", "predict", "save_evaluation", "validation_path"]
EVAL_SCHEMA_VERSION = 1
EVAL_NAME = "eval.json"
CONFUSION_NAME = "confusion.png"
SPLITS = ("val", "train")  # --data names of the run's own splits; anything else is a folder
TOP_K = 5
# --------------------------------------------------------------------------------------------
# The record


class TopK(Record):
    """Samples whose true class is among the model's ``k`` highest logits."""

    k: int
    correct: int
    accuracy: float


class ClassRow(Record):
    """One class: its samples, how many were predicted right, and their mean loss (None without samples)."""

    name: str
    samples: int
    correct: int
    accuracy: float | None
    loss: float | None


class DataRecord(Record):
    """What was evaluated: the run's own split, or a folder."""

    kind: str  # split | folder
    source: str  # synthetic | imagefolder | cifar10
    split: str | None = None
    root: str | None = None
    classes_checked: str  # names | count: whether the run's class names were known to compare


class SummaryCheck(Record):
    """``summary.json``'s validation figures, kept when the run's own val split is evaluated at its step."""

    step: int
    val_accuracy: float | None
    val_loss: float | None


class EvalResult(Record):
    """What ``eval.json`` holds."""

    run_dir: str
    model: str
    weights: str
    weights_kind: str  # checkpoint | trainable | weights
    step: int | None
    data: DataRecord
    device: str
    precision: str
    batch_size: int
    samples: int
    seconds: float
    loss: float
    top1: TopK
    top5: TopK
    classes: list[str]
    per_class: list[ClassRow]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    summary: SummaryCheck | None = None
    notes: list[str] = []
    # A factory, not a default, so that the committed JSON Schema does not name a version.
    freezetune_version: str = Field(default_factory=lambda: __version__)
    schema_version: int = EVAL_SCHEMA_VERSION


# --------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_run(run_dir: str | Path, data: str | None = None, checkpoint: str | Path | None = None,
                 device: str | None = None, batch_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluates a run's model and returns the record (nothing is written; see :func:`save_evaluation`).

    Args:
        run_dir: The run folder (it must hold ``config.yaml``).
        data: ``val`` (default) or ``train`` for the run's own split; otherwise an ImageFolder
            root: its ``val/`` when it holds ``train/`` and ``val/``, else the folder itself.
        checkpoint: Weights to evaluate instead of the run's checkpoint: a freezetune
            ``checkpoint.pt``, a trainable-only or exported ``.safetensors``, or a ``.pth`` state dict.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; default the run's ``device``.
        batch_size: Default the run's ``data.batch_size`` (what its validation used).
        progress: Called as ``progress(samples_done, samples_total)`` after every batch.

    Raises:
        MissingExtraError: torchmetrics is not installed.
        RunDirError, WeightsError, DataError, DeviceError: One line saying what is wrong.
    """
    metrics = _torchmetrics()
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    dataset, classes, record, notes = eval_dataset(run_dir, cfg, data)
    weights = load_weights(run_dir, cfg, checkpoint)
    dev = resolve_device(device or cfg.device)
    precision = cfg.train.precision
    if precision == "fp16" and dev.type != "cuda":
        notes.append("the run trained in fp16, which needs CUDA: evaluated in fp32")
        precision = "fp32"
    bs = batch_size or cfg.data.batch_size
    run_summary = _summary(run_dir)  # read once: the validation path and the figures to compare with
    path = validation_path(cfg, run_summary)
    if path is not None:
        notes.append(f"through the frozen prefix ({', '.join(path['prefix'])}"
                     f"{', BatchNorm folded' if path['fold'] else ''}), as the run's validation was")
    start = time.perf_counter()
    counts = predict(weights.model, dataset, len(classes), metrics, dev, precision=precision,
                     channels_last=cfg.train.channels_last, batch_size=bs, num_workers=worker_count(cfg.data, dev),
                     progress=progress, path=path)
    seconds = time.perf_counter() - start
    summary = _summary_check(run_summary, record, weights.step)
    return _result(run_dir, cfg, weights, record, classes, counts, summary, notes,
                   device=device_description(dev), precision=precision, batch_size=bs, seconds=seconds)


def save_evaluation(result: EvalResult, out: str | Path) -> list[Path]:
    """Writes ``eval.json`` and ``confusion.png`` into ``out`` (atomically); returns their paths.

    Raises:
        FolderLockedError: If another process writes ``out`` (a run still training there).
        WriteError: If a file cannot be written (the previous one stays).
    """
    from freezetune.render.evaluation import confusion_plot

    out = Path(out)
    paths = [out / EVAL_NAME, out / CONFUSION_NAME]
    with hold(out, "evaluate", create=False):
        write_json(paths[0], result.model_dump())
        confusion_plot(result.model_dump(), paths[1])
    return paths


def check_out(out: str | Path) -> Path:
    """The folder eval.json goes to, created if need be.

    Raises:
        RunDirError: If it is a file or cannot be created.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    return out


def run_config(run_dir: Path) -> Config:
    """The run folder's own config.

    Raises:
        RunDirError: If the folder is missing or holds no config.yaml.
    """
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: run folder not found")
    return RunDir(run_dir).config()


def _torchmetrics():
    try:
        from torchmetrics import classification
    except ImportError:
        raise MissingExtraError.of("freezetune evaluate", "torchmetrics", "eval") from None
    return classification


# --------------------------------------------------------------------------------------------
# Data


def eval_dataset(run_dir: Path, cfg: Config, data: str | None) -> tuple[Dataset, list[str], DataRecord, list[str]]:
    """The dataset to evaluate, the run's class names, what it is, and notes for the user.

    Raises:
        DataError: If the split does not exist, the folder has no images, or its classes differ.
    """
    if data is None or data in SPLITS:
        return _run_split(run_dir, cfg, data or "val")
    return _folder(cfg, Path(data))


def _run_split(run_dir: Path, cfg: Config, split: str) -> tuple[Dataset, list[str], DataRecord, list[str]]:
    # Without augmentation the train split gets the eval transform too (resize + centre crop).
    built = build_data(cfg.data.model_copy(update={"augment": False}), cfg.model.num_classes, cfg.seed)
    dataset = built.val if split == "val" else built.train
    if dataset is None:
        raise DataError(f"{run_dir}: the run has no validation split (data.val_size 0 or no val/ folder); "
                        "pass --data train or --data FOLDER")
    root = None if cfg.data.source == "synthetic" else cfg.data.root
    record = DataRecord(kind="split", source=cfg.data.source, split=split, root=root, classes_checked="names")
    return dataset, list(built.classes), record, []


def _folder(cfg: Config, path: Path) -> tuple[Dataset, list[str], DataRecord, list[str]]:
    from torchvision.datasets.folder import find_classes

    if not path.is_dir():
        raise DataError(f"--data {path}: not val, train or a folder")
    folder = path / "val" if (path / "train").is_dir() and (path / "val").is_dir() else path
    try:
        found, _ = find_classes(folder)
    except (FileNotFoundError, OSError):
        raise DataError(f"--data {folder}: no class folders in it") from None
    wanted, notes = run_classes(cfg), []
    if wanted is None:
        if len(found) != cfg.model.num_classes:
            raise DataError(f"--data {folder}: has {len(found)} class folders, the run's model "
                            f"{cfg.model.num_classes} classes")
        notes.append("the run's class names are unknown (its data is not here): checked the class count only")
    elif found != wanted:
        raise DataError(f"--data {folder}: {class_difference(found, wanted)}")
    dataset = CheckedImageFolder(folder, data_transform(cfg.data, train=False), cfg.data.skip_bad_images)
    record = DataRecord(kind="folder", source="imagefolder", root=str(folder),
                        classes_checked="count" if wanted is None else "names")
    return dataset, found, record, notes


def run_classes(cfg: Config) -> list[str] | None:
    """The class names the run trained on, in label order; None where its data is not on this machine."""
    if cfg.data.source == "imagefolder":
        from torchvision.datasets.folder import find_classes

        try:
            return find_classes(Path(cfg.data.root) / "train")[0]
        except (FileNotFoundError, OSError, TypeError):
            return None
    # Synthetic names come from build_data itself (one tiny image is made); CIFAR-10 needs its files.
    try:
        return build_data(cfg.data.model_copy(update={"train_size": 1, "val_size": 0}),
                          cfg.model.num_classes, cfg.seed).classes
    except DataError:
        return None


def class_difference(found: list[str], wanted: list[str]) -> str:
    """One line saying how a folder's classes differ from the run's."""
    missing = [c for c in wanted if c not in found]
    extra = [c for c in found if c not in wanted]
    parts = [f"{len(found)} classes where the run has {len(wanted)}"]
    if missing:
        parts.append(f"missing {few(missing)}")
    if extra:
        parts.append(f"not in the run: {few(extra)}")
    return "its classes differ from the run's: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# The pass


@dataclass
class Counts:
    """What one pass over a dataset counted (tensors on the CPU)."""

    confusion: torch.Tensor  # (C, C) int64, rows true, columns predicted
    topk: int
    topk_correct: int
    loss_sum: torch.Tensor  # (C,) float64, per true class


def validation_path(cfg: Config, summary: dict | None) -> dict | None:
    """How the run's validation computed its logits, when not through the plain model; None otherwise.

    A run whose frozen prefix was cached validated through that prefix (run without autograd,
    its BatchNorm folded into the convolutions where it was) and the trainable suffix on its
    output: other kernels than the plain model's, so other last bits. Evaluating the same way
    makes top-1 on the run's own split equal ``summary.json``'s count for count.

    Returns:
        ``{"prefix": [stages], "fold": bool, "channels_last": bool}`` from the summary's ``speed``,
        or None (no summary yet, or the run validated through the model itself).
    """
    speed = (summary or {}).get("speed") or {}
    if not (speed.get("prefix_without_autograd") and (speed.get("feature_cache") or {}).get("enabled")):
        return None
    return {"prefix": list(speed["frozen_prefix"]), "fold": bool(speed.get("folded_batchnorm")),
            "channels_last": bool(speed.get("prefix_channels_last")), "model": cfg.model.name}


def _summary(run_dir: Path) -> dict | None:
    try:
        return RunDir(run_dir).summary()
    except RunDirError:
        return None


@torch.inference_mode()
def predict(model: nn.Module, dataset: Dataset, num_classes: int, metrics, device: torch.device, *,
            precision: str = "fp32", channels_last: bool = False, batch_size: int = 32, num_workers: int = 0,
            progress: Callable[[int, int], None] | None = None, path: dict | None = None) -> Counts:
    """Runs the model over ``dataset`` in eval mode, as the run's validation does, and counts.

    Args:
        model: The network (moved to ``device`` and left in eval mode).
        dataset: Yields (image, label).
        num_classes: Width of the head.
        metrics: The ``torchmetrics.classification`` module.
        device: Where to run.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast.
        channels_last: Run in the channels-last layout (``train.channels_last``).
        batch_size: Samples per forward.
        num_workers: DataLoader workers.
        progress: Called with (samples done, samples total) after every batch.
        path: :func:`validation_path`: go through the frozen prefix as the run's validation did.
    """
    k = min(TOP_K, num_classes)
    confusion = metrics.MulticlassConfusionMatrix(num_classes).to(device)
    topk = metrics.MulticlassStatScores(num_classes, top_k=k, average="micro").to(device)
    loss_sum = torch.zeros(num_classes, dtype=torch.float64, device=device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).eval()
    forward = model
    if path is not None:
        forward = SplitForward(model, path["model"], path["prefix"], fold=path["fold"],
                               prefix_channels_last=path["channels_last"], suffix_channels_last=channels_last)
    done, total = 0, len(dataset)
    for x, y in make_loader(dataset, batch_size, num_workers):
        x, y = x.to(device, memory_format=layout), y.to(device)
        with autocast(precision, device):
            logits = forward(x).float()
        loss_sum.index_add_(0, y, F.cross_entropy(logits, y, reduction="none").double())
        confusion.update(logits, y)
        topk.update(logits, y)
        done += int(y.shape[0])
        if progress is not None:
            progress(done, total)
    tp = int(topk.compute()[0])  # micro stat scores: [tp, fp, tn, fn, support]
    return Counts(confusion.compute().cpu().to(torch.int64), k, tp, loss_sum.cpu())


def _result(run_dir: Path, cfg: Config, weights: Weights, record: DataRecord, classes: list[str], counts: Counts,
            summary: SummaryCheck | None, notes: list[str], **run) -> EvalResult:
    conf = counts.confusion
    per_true = conf.sum(1).tolist()
    correct = conf.diagonal().tolist()
    samples = sum(per_true)
    if samples == 0:
        raise DataError(f"{record.root or record.split}: no samples to evaluate")
    losses = counts.loss_sum.tolist()
    rows = [ClassRow(name=name, samples=n, correct=c, accuracy=c / n if n else None,
                     loss=total / n if n else None)
            for name, n, c, total in zip(classes, per_true, correct, losses, strict=True)]
    return EvalResult(
        run_dir=str(run_dir), model=cfg.model.name, weights=str(weights.path), weights_kind=weights.kind,
        step=weights.step, data=record, samples=samples, loss=sum(losses) / samples,
        top1=TopK(k=1, correct=sum(correct), accuracy=sum(correct) / samples),
        top5=TopK(k=counts.topk, correct=counts.topk_correct, accuracy=counts.topk_correct / samples),
        classes=classes, per_class=rows, confusion=conf.tolist(), summary=summary, notes=notes, **run,
    )


def _summary_check(summary: dict | None, record: DataRecord, step: int | None) -> SummaryCheck | None:
    """summary.json's validation result, when it is of the same weights on the same split."""
    if summary is None or record.kind != "split" or record.split != "val":
        return None
    try:
        val = summary["val"]
        if step is None or summary["steps"] != step:
            return None
        return SummaryCheck(step=step, val_accuracy=val["accuracy"], val_loss=val["loss"])
    except (KeyError, TypeError):
        return None
