"""Data-parallel training under ``torchrun`` (DistributedDataParallel); no home-made launcher.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; freezetune reads them, joins the process group
(NCCL on CUDA, gloo on CPU) and wraps only what trains in DDP. DDP registers just the parameters
that require grad, so frozen parameters are never all-reduced; a gradual-unfreezing phase changes
that set, so the wrapper is rebuilt after each unfreeze.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from freezetune.errors import DeviceError


@dataclass(frozen=True)
class DistInfo:
    """A process's place in a torchrun job (world_size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine (they share its CPUs)

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and prints."""
        return self.rank == 0


def from_env() -> DistInfo:
    """Reads torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init(info: DistInfo, device_name: str) -> torch.device:
    """Joins the process group and returns this rank's device.

    Raises:
        DeviceError: If CUDA is requested but there are fewer GPUs than local ranks.
    """
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available() or info.local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"rank {info.rank}: local rank {info.local_rank} needs a GPU but "
                f"{torch.cuda.device_count()} are visible; use device: cpu for gloo"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Wraps the training forward in DDP (a no-op for a single process)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers are not broadcast: frozen BatchNorm buffers are identical on every rank already,
    # and broadcasting them every forward would cost time for nothing.
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def mean(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a float over all ranks (the value itself for one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. one rank got SIGTERM)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def share_cache(cache, info: DistInfo, device: torch.device, round_bytes: int = 256 * 2**20) -> int:
    """Gives every rank every sample's cached features that any rank holds; returns how many it received.

    Each rank is dealt other samples every epoch, so after the filling epoch each holds only its
    share of the feature cache. Every sample that some rank lacks is sent once, by the lowest rank
    that holds it, through all-gathers of at most ``round_bytes`` at a time over all ranks
    (bounded memory; every rank runs the same number of rounds). A sample no rank has seen yet (the
    remainder an epoch drops so that shards are equal) stays missing until a later epoch fills it.

    Args:
        cache: This rank's :class:`~freezetune.speed.feature_cache.FeatureCache`.
        info: The distributed setup (nothing happens for one process).
        device: This rank's device, where the collectives run (CUDA under NCCL).
        round_bytes: What one round's all-gather may hold, every rank's part together.
    """
    if not info.enabled:
        return 0
    held = torch.stack(gather_tensor(cache.filled.to(device, torch.uint8), info)).bool().cpu()  # (ranks, N)
    owner = torch.where(held.any(0), held.to(torch.int8).argmax(0), -1)  # lowest rank holding each sample
    wanted = ~held.all(0) & (owner >= 0)
    mine = torch.nonzero(wanted & (owner == info.rank)).flatten()
    counts = [int(c) for c in gather_tensor(torch.tensor([len(mine)], device=device), info)]
    shape = _feature_shape(cache, info, device)
    chunk = max(1, round_bytes // (info.world_size * 4 * max(1, math.prod(shape))))  # samples per rank per round
    received = 0
    for start in range(0, max(counts), chunk):
        idx = mine[start:start + chunk]
        feats = torch.zeros((chunk, *shape), dtype=torch.float32, device=device)
        labels = torch.zeros(chunk, dtype=torch.long, device=device)
        if len(idx):
            f, y = cache.get(idx)
            feats[: len(idx)], labels[: len(idx)] = f.to(device), y.to(device)
        for rank, (f, y) in enumerate(zip(gather_tensor(feats, info), gather_tensor(labels, info), strict=True)):
            n = min(chunk, max(0, counts[rank] - start))
            if rank == info.rank or n == 0:
                continue
            sent = torch.nonzero(wanted & (owner == rank)).flatten()[start:start + n]
            need = ~cache.filled[sent]
            if need.any():
                cache.put(sent[need], f[:n][need.to(f.device)], y[:n][need.to(y.device)])
                received += int(need.sum())
    return received


def _feature_shape(cache, info: DistInfo, device: torch.device) -> tuple[int, ...]:
    """The per-sample feature shape, from the rank that holds features (a rank may hold none yet)."""
    mine = list(cache.features.shape[1:]) if cache.features is not None else []
    dims = torch.tensor(mine + [0] * (8 - len(mine)), dtype=torch.long, device=device)
    dist.all_reduce(dims, op=dist.ReduceOp.MAX)  # every rank that holds features holds the same shape
    return tuple(int(d) for d in dims.tolist() if d > 0)


def gather_tensor(t: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's tensor of the same shape, in rank order."""
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t.contiguous())
    return out


def barrier(info: DistInfo) -> None:
    """Waits for every rank."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leaves the process group."""
    if info.enabled and dist.is_initialized():
        # Tearing gloo down while a peer is still connected can abort the process
        # ("terminate called without an active exception"): leave together.
        dist.barrier()
        dist.destroy_process_group()
