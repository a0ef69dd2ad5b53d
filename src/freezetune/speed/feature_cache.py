"""Frozen-prefix feature cache: compute the frozen prefix once per sample, reuse it every epoch.

It is only correct when the prefix output for a sample never changes: the prefix is frozen, its
BatchNorm is frozen (``batchnorm: train`` would change the statistics every step) and the data
transforms are deterministic (random augmentation gives a different input every epoch). The cache
is keyed on a hash of everything that changes the features (:func:`cache_key`: the prefix weights,
the data and the dataset's identity, how and where the prefix computes), so a cache written for
other weights, other data, another precision or another device is never used.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from freezetune.atomic import write_json
from freezetune.config import Config
from freezetune.freezing.integrity import combined_sha256, fingerprint
from freezetune.freezing.plan import FreezePlan

DEFAULT_MAX_BYTES = 2 * 2**30
CACHE_FILE = "feature_cache.bin"
CACHE_META = "feature_cache.json"


def cache_key(model: torch.nn.Module, plan: FreezePlan, config: Config, dataset: Dataset,
              device: torch.device | str, path: dict) -> str:
    """Hash of everything that changes a sample's cached features.

    The frozen weights, the data config and the dataset's files or tensors, the seed and model
    config, and how the prefix computes: ``path`` (which stages it covers, folded BatchNorm, the
    layout, compilation, the precision), the device (and GPU model) and the torch version. A
    resumed run may change ``train.precision`` or the device: its cache is then refilled, never
    reused, since other kernels give other last bits.

    Args:
        model: The model, frozen as ``plan`` says.
        plan: Its freeze plan.
        config: The run's config.
        dataset: The training set.
        device: Where the prefix runs.
        path: ``prefix`` (stage names), ``fold``, ``channels_last``, ``compile``, ``precision``.
    """
    device = torch.device(device)
    parts = {
        "frozen": combined_sha256(fingerprint(model, plan)),
        "data": config.data.model_dump(mode="json"),
        "seed": config.seed,
        "model": config.model.model_dump(mode="json"),
        "path": path,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "dataset": dataset_identity(dataset),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def dataset_identity(dataset: Dataset) -> str:
    """A string that changes when the dataset's samples change (files, sizes, mtimes, or tensors)."""
    inner = getattr(dataset, "inner", dataset)
    samples = getattr(inner, "samples", None)
    if samples is not None:
        h = hashlib.sha256()
        for path, label in samples:
            st = Path(path).stat()
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    tensors = getattr(inner, "tensors", None)
    if tensors is not None:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()
    return f"{type(inner).__name__}:{len(inner)}"


class FeatureCache:
    """Per-sample prefix outputs, in memory up to ``max_bytes``, else memory-mapped in the run folder.

    The in-memory store lives on the training device. On a GPU that matters: an H200 run with the
    store in host memory (224 px, batch 64) spent longer copying a stem-prefix batch (51 MiB) to the
    GPU every step than recomputing the stem took, so caching early prefixes was slower than not
    caching (0.92x vs 1.25x over full fine-tuning).

    Args:
        size: Number of samples in the training set.
        run_dir: Where a memory-mapped cache lives.
        key: From :func:`cache_key`; a file with another key is discarded.
        max_bytes: In-memory limit (device memory on a GPU).
        device: Where the in-memory store lives; a memory-mapped one is always in host memory.
        rank: The torchrun rank; each rank of a distributed run keeps its own memory-mapped file
            (``feature_cache.rank1.bin``...), since every rank holds the whole cache.
    """

    def __init__(self, size: int, run_dir: Path, key: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 device: torch.device | str = "cpu", rank: int = 0):
        self.size, self.run_dir, self.key, self.max_bytes = size, Path(run_dir), key, max_bytes
        tag = f".rank{rank}" if rank else ""
        self.file = self.run_dir / CACHE_FILE.replace(".bin", f"{tag}.bin")
        self.meta_file = self.run_dir / CACHE_META.replace(".json", f"{tag}.json")
        self.device = torch.device(device)
        self.features: torch.Tensor | None = None
        self.labels = torch.zeros(size, dtype=torch.long)
        self.filled = torch.zeros(size, dtype=torch.bool)
        self.on_disk = False
        self._array: np.memmap | None = None
        self._reuse_file()

    @property
    def complete(self) -> bool:
        """True once every sample's features are stored."""
        return bool(self.filled.all())

    @property
    def nbytes(self) -> int:
        """Bytes held by the feature store."""
        return 0 if self.features is None else self.features.numel() * self.features.element_size()

    def put(self, indices: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Stores a batch of prefix outputs (as float32, where the store lives) for these sample indices."""
        if self.features is None:
            self._allocate(tuple(features.shape[1:]))
        features = features.detach().to(self.features.device, torch.float32)
        self.features[indices.to(self.features.device)] = features.contiguous()
        self.labels[indices] = labels.cpu()
        self.filled[indices] = True
        if self.on_disk and self.complete:
            self._write_meta()

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the stored features (on the store's device) and labels for these sample indices."""
        return self.features[indices.to(self.features.device)], self.labels[indices]

    def _allocate(self, shape: tuple[int, ...]) -> None:
        if self.size * math.prod(shape) * 4 <= self.max_bytes:
            self.features = torch.empty((self.size, *shape), dtype=torch.float32, device=self.device)
            return
        self.on_disk = True
        self.meta_file.unlink(missing_ok=True)  # the old file is being replaced
        self._array = np.memmap(self.file, dtype=np.float32, mode="w+", shape=(self.size, *shape))
        self.features = torch.from_numpy(self._array)

    def _reuse_file(self) -> None:
        """Opens a complete memory-mapped cache left by this run (e.g. before a resume) if its key matches."""
        path, meta_path = self.file, self.meta_file
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return
        shape = tuple(meta.get("shape", ()))
        if meta.get("key") != self.key or not path.exists() or len(meta.get("labels", [])) != self.size:
            return
        if path.stat().st_size != self.size * math.prod(shape) * 4:
            return
        self._array = np.memmap(path, dtype=np.float32, mode="r+", shape=(self.size, *shape))
        self.features = torch.from_numpy(self._array)
        self.labels = torch.tensor(meta["labels"], dtype=torch.long)
        self.filled[:] = True
        self.on_disk = True

    def _write_meta(self) -> None:
        self._array.flush()
        write_json(self.meta_file, {
            "key": self.key, "shape": list(self.features.shape[1:]), "labels": self.labels.tolist(),
        })


class IndexedDataset(Dataset):
    """Wraps a dataset so each sample also yields its index (to file features under it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (*item, index)
