"""Datasets and loaders.

The batch order is a pure function of (seed, epoch, position): :class:`EpochSampler` permutes with a
generator seeded from both, so a resumed run can skip exactly the batches it already trained on and
see the rest in the same order as an uninterrupted run. Random augmentation is a pure function of
(seed, epoch, sample) too (:class:`SeededSamples`), so it does not depend on which loader worker
draws a sample, on how many workers there are, or on where a resumed run starts.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from freezetune.config import DataConfig
from freezetune.errors import DataError, first_line

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Data:
    """Everything the trainer needs to know about the data.

    Attributes:
        train: The training dataset.
        val: The validation dataset, or None.
        num_classes: Number of classes the dataset has.
        classes: Class names in label order.
    """

    train: Dataset
    val: Dataset | None
    num_classes: int
    classes: list[str]


class SeededSamples(Dataset):
    """Draws each sample's random transforms from its own seed: a function of (seed, epoch, index).

    With the global RNG, the crops a sample gets would depend on the worker that loads it (each
    worker has its own RNG stream) and on how many samples came before it in that stream, so a
    run resumed mid-epoch, or run with another ``data.num_workers``, would see other crops.

    Args:
        dataset: The augmented training set.
        seed: The run's seed.
        epoch: The epoch this view serves (a new view per epoch).
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # Forked so that the caller's RNG stream is left where it was (num_workers 0 loads here).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), resumable mid-epoch.

    Args:
        size: Number of samples.
        seed: Run seed.
        epoch: Epoch number; each epoch gets its own permutation.
        start: Index into this rank's share to start from (samples already seen are skipped).
        rank: This process's rank under torchrun.
        world_size: Number of processes; each takes every world_size-th sample of the permutation.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)
        # Every rank takes an equal share (a remainder of < world_size samples is dropped), so all
        # ranks run the same number of steps and DDP's collectives never wait on a finished rank.
        order = order[: len(order) - len(order) % self.world_size][self.rank :: self.world_size]
        return iter(order[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, self.size // self.world_size - self.start)


def synthetic_dataset(size: int, image_size: int, num_classes: int, seed: int) -> TensorDataset:
    """Builds a deterministic, learnable image classification set.

    Each class has its own colour tint and stripe orientation, drawn with a random phase, contrast
    and noise per image. Both cues survive global average pooling of even random convolutional
    features, so loss falls and accuracy beats chance within a few epochs whether the frozen
    backbone is pretrained or random.

    Args:
        size: Number of images.
        image_size: Height and width in pixels.
        num_classes: Number of classes (labels cycle through them).
        seed: Generator seed; the same seed gives the same tensors.

    Returns:
        A TensorDataset of normalised float images (N, 3, H, W) and int64 labels.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=g)]
    k = labels.float()
    angle = math.pi * k / num_classes
    tint = torch.stack(
        [torch.cos(2 * math.pi * (k / num_classes + c / 3)) for c in range(3)], dim=1
    )  # (N, 3): a distinct hue per class
    coords = torch.linspace(-1, 1, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    phase = 2 * math.pi * torch.rand(size, 1, 1, generator=g)
    stripes = torch.sin(6 * math.pi * proj + phase)  # (N, H, W)
    contrast = 0.15 + 0.1 * torch.rand(size, 1, 1, 1, generator=g)
    images = 0.5 + contrast * stripes[:, None] + 0.12 * tint[:, :, None, None]
    images = images + 0.08 * torch.randn(size, 3, image_size, image_size, generator=g)
    images = images.clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return TensorDataset((images - mean) / std, labels)


class CheckedImageFolder(Dataset):
    """torchvision ImageFolder that names the file when an image cannot be read.

    With ``skip_bad=True`` files PIL cannot open or verify are dropped up front, each with a
    warning, so that no batch can consist of bad images only; a file that still fails to decode
    later yields None (dropped by :func:`collate_skip_none`) and a warning, instead of an error.
    """

    def __init__(self, root: Path, transform, skip_bad: bool):
        from torchvision.datasets import ImageFolder

        try:
            self.inner = ImageFolder(str(root), transform=transform)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{root}: no class folders with images ({first_line(e)})") from None
        self.skip_bad = skip_bad
        self.classes = self.inner.classes
        if skip_bad:
            kept = [s for s in self.inner.samples if _openable(s[0])]
            if not kept:
                raise DataError(f"{root}: no readable images (every file was skipped)")
            self.inner.samples = self.inner.imgs = kept
            self.inner.targets = [t for _, t in kept]

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        path, _ = self.inner.samples[index]
        try:
            return self.inner[index]
        except Exception as e:  # PIL raises several unrelated types for bad files
            if self.skip_bad:
                log.warning("skipping unreadable image %s (%s)", path, first_line(e))
                return None
            raise DataError(
                f"{path}: cannot read image ({first_line(e)}); fix or remove it, "
                "or set data.skip_bad_images: true"
            ) from None


def _openable(path: str) -> bool:
    """Whether PIL can identify and verify the file (cheap: no full decode)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception as e:  # PIL raises several unrelated types for bad files
        log.warning("skipping unreadable image %s (%s)", path, first_line(e))
        return False


def collate_skip_none(batch):
    """Default collation after dropping samples that failed to load."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    if not batch:
        raise DataError("every image in a batch was unreadable")
    return default_collate(batch)


def build_data(cfg: DataConfig, num_classes: int, seed: int) -> Data:
    """Creates the train and validation datasets described by ``cfg``.

    Raises:
        DataError: If a root or class folder is missing, or the class count does not fit.
    """
    if cfg.source == "synthetic":
        train = synthetic_dataset(cfg.train_size, cfg.image_size, num_classes, seed)
        val = (
            synthetic_dataset(cfg.val_size, cfg.image_size, num_classes, seed + 7919)
            if cfg.val_size
            else None
        )
        return Data(train, val, num_classes, [f"class{i}" for i in range(num_classes)])
    if cfg.source == "imagefolder":
        return _imagefolder(cfg, num_classes)
    return _cifar10(cfg, num_classes)


def _imagefolder(cfg: DataConfig, num_classes: int) -> Data:
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {root}: folder not found")
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise DataError(f"data.root {root}: expected a train/ folder of class folders")
    train = CheckedImageFolder(train_dir, _transform(cfg, train=True), cfg.skip_bad_images)
    val = (
        CheckedImageFolder(val_dir, _transform(cfg, train=False), cfg.skip_bad_images)
        if val_dir.is_dir()
        else None
    )
    if val is not None and val.classes != train.classes:
        raise DataError(f"{val_dir}: class folders differ from {train_dir}")
    _check_classes(len(train.classes), num_classes, str(train_dir))
    return Data(train, val, len(train.classes), train.classes)


def _cifar10(cfg: DataConfig, num_classes: int) -> Data:
    from torchvision.datasets import CIFAR10

    _check_classes(10, num_classes, "cifar10")
    try:
        train = CIFAR10(cfg.root, train=True, download=cfg.download, transform=_transform(cfg, True))
        val = CIFAR10(cfg.root, train=False, download=cfg.download, transform=_transform(cfg, False))
    except RuntimeError as e:
        raise DataError(
            f"data.root {cfg.root}: CIFAR-10 not found ({first_line(e)}); "
            "set data.download: true or place cifar-10-batches-py there"
        ) from None
    return Data(train, val, 10, list(train.classes))


def _transform(cfg: DataConfig, train: bool):
    # PIL decodes and resizes: torchvision's libjpeg-turbo decoder (deprecated in torchvision 0.29
    # for TorchCodec's) decodes a 256-px JPEG faster, but with the resize on the tensor the whole
    # transform measured no faster on the 2-core CPU (1.02x; scripts/bench_data.py).
    from torchvision import transforms as T

    size = cfg.image_size
    if train and cfg.augment:
        head = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _check_classes(found: int, wanted: int, where: str) -> None:
    if found != wanted:
        raise DataError(f"{where}: has {found} classes but model.num_classes is {wanted}")


# Loader workers for data.num_workers: auto beside a GPU: one per CPU this process may use, minus
# one for the process that drives the GPU, up to 8 (more rarely pays; each holds its own copies).
MAX_AUTO_WORKERS = 8


def worker_count(cfg: DataConfig, device: torch.device | str, ranks_here: int = 1) -> int:
    """The DataLoader worker processes for ``data.num_workers`` (``auto`` decided here).

    ``auto``: none for the synthetic set (tensors already in memory: a worker would only add
    copying between processes), and none for CPU training, whose step uses every core through
    its threads. Measured on 2 cores (docs/benchmarks.md): a worker left a heavy step (224 px,
    frozen through layer3, 3% of the time waiting) no faster beyond noise, and made a light one
    (32 px, fc only, half the time decoding) 0.81x as fast: it takes turns with the step's
    threads on the cores. Beside an accelerator the CPUs are
    free to decode: one worker per CPU this process may use (its affinity, shared among the
    torchrun ranks on the machine) minus one, up to :data:`MAX_AUTO_WORKERS`.

    Args:
        cfg: The data config.
        device: Where the training steps run.
        ranks_here: torchrun processes on this machine (they share its CPUs).
    """
    if cfg.num_workers != "auto":
        return cfg.num_workers
    if cfg.source == "synthetic" or torch.device(device).type == "cpu":
        return 0
    cpus = max(1, usable_cpus() // max(1, ranks_here))
    return min(MAX_AUTO_WORKERS, max(1, cpus - 1))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Returns a DataLoader; pass an :class:`EpochSampler` for training, None for evaluation.

    Args:
        dataset: The dataset.
        batch_size: Samples per batch.
        num_workers: Worker processes (0 loads in the main process).
        sampler: The sample order, or None for dataset order.
        pin_memory: Whether to pin batches for faster host-to-device copies.
        seed: Seeds the workers' RNGs (and so worker-side augmentation).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_skip_none,
        persistent_workers=False,
        # Without its own generator every new iterator draws its worker seed from the global torch
        # RNG, even with num_workers=0; a run resumed mid-epoch would then see different
        # main-process augmentation than the uninterrupted run.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C in a terminal (and SIGTERM sent to a process group) reaches the workers too. The main
    # process turns it into "stop after this step"; a worker dying of it would instead crash the
    # step being finished. The main process still shuts its workers down when it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

