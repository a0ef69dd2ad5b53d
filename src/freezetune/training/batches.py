"""An epoch's batches: in the run's one seeded order, from images or from the feature cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from freezetune.config import Config
from freezetune.speed.feature_cache import FeatureCache, IndexedDataset
from freezetune.training import distributed as dist
from freezetune.training.data import EpochSampler, SeededSamples, make_loader, worker_count
from freezetune.training.step import Batch, BatchSource


def epoch_batches(cfg: Config, train_set, epoch: int, skip_batches: int, info: dist.DistInfo,
                  device: torch.device, cache: FeatureCache | None) -> Iterator[Batch]:
    """The epoch's remaining batches, in :class:`EpochSampler`'s order, from the cache once it is full.

    Args:
        cfg: The run's config (``data.*`` and the seed).
        train_set: The training set.
        epoch: The epoch (0-based); it seeds the order.
        skip_batches: Batches of this epoch already trained (a resumed run skips them).
        info: The distributed setup (each rank takes its share).
        device: Where steps run (pinned memory on CUDA).
        cache: The feature cache, or None.
    """
    bs = cfg.data.batch_size
    sampler = EpochSampler(len(train_set), cfg.seed, epoch, skip_batches * bs,
                           rank=info.rank, world_size=info.world_size)
    if cache is not None and cache.complete:
        order = torch.tensor(list(sampler), dtype=torch.long)
        for chunk in order.split(bs):
            features, labels = cache.get(chunk)
            yield Batch(features, labels, chunk, BatchSource.FEATURES)
        return
    if cfg.data.augment:  # a cache is never on with augmentation: its features would change every epoch
        train_set = SeededSamples(train_set, cfg.seed, epoch)
    dataset = IndexedDataset(train_set) if cache is not None else train_set
    workers = worker_count(cfg.data, device, info.local_world_size)
    loader = make_loader(dataset, bs, workers, sampler, pin_memory=device.type == "cuda",
                         seed=cfg.seed * 1_000_003 + epoch)
    for b in loader:
        if cache is not None:
            yield Batch(b[0], b[1], b[2], BatchSource.IMAGES_FILL_CACHE)
        else:
            yield Batch(b[0], b[1], None, BatchSource.IMAGES)
