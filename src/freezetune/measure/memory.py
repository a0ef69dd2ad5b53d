"""Peak memory: CUDA's high-water mark, or the process's resident set size on CPU; and its parts.

A CPU peak can only be attributed to one arm of a comparison if the arm has the process to
itself; :func:`reset_peak_rss` and :func:`high_water_rss_bytes` bracket such a window on Linux.
:class:`SavedActivations` counts what autograd keeps for backward, the part of a training step's
memory that freezing (a frozen weight needs no saved input) can remove; :func:`memory_parts` adds
the weights, their gradients and the optimizer state beside it.
"""

from __future__ import annotations

import re
import resource
import sys

import torch
from torch import nn


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new CUDA peak-memory window (CPU peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Returns the peak memory figure for the device and what it means.

    On CUDA: ``torch.cuda.max_memory_allocated`` since the last reset. On CPU: the process's peak
    resident set size, which includes the Python interpreter and libraries.
    """
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    return {"peak_bytes": peak_rss_bytes(), "kind": "process_peak_rss"}


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def current_rss_bytes() -> int:
    """The process's current resident set size in bytes (Linux; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), else the lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def storage_key(t: torch.Tensor) -> int:
    """The identity of a tensor's storage: views share it, and so do meta tensors' copies of nothing.

    Meta tensors all have data_ptr 0, so the storage object's identity tells them apart; views
    (e.g. the transposed fc weight that addmm saves) share their base's storage.
    """
    return t.untyped_storage()._cdata


class SavedActivations:
    """Counts the bytes autograd saves for backward inside a ``with`` block (a saved-tensor hook).

    Each storage counts once, whole, however many views of it are saved; the model's own
    parameters (a convolution saves its weight for the input gradient) are not counted, since the
    model holds them anyway. On meta tensors it counts what a real forward would save.

    Args:
        model: The model whose parameters are left out.
    """

    def __init__(self, model: nn.Module):
        self._params = {storage_key(p) for p in model.parameters()}
        self._saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self._params:
            self._saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    @property
    def tensors(self) -> int:
        """Distinct storages saved."""
        return len(self._saved)

    @property
    def nbytes(self) -> int:
        """Their bytes."""
        return sum(self._saved.values())


# The keys of memory_parts, for the readers that copy them (the sweep's memory pass).
MEMORY_PARTS = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes")


def memory_parts(model: nn.Module, optimizer_state_bytes: int, saved_activation_bytes: int | None) -> dict:
    """What a training step's memory is made of, beside its measured peak.

    Args:
        model: The model (its ``requires_grad`` mask says which weights have gradients).
        optimizer_state_bytes: What its optimizer keeps (``training.optim.optimizer_state_bytes``).
        saved_activation_bytes: One step's :class:`SavedActivations` count, or None if not counted.

    Returns:
        ``param_bytes`` (every weight), ``grad_bytes`` (the trainable ones' gradients),
        ``optimizer_state_bytes`` and ``saved_activation_bytes``.
    """
    params = list(model.parameters())
    values = (sum(p.numel() * p.element_size() for p in params),
              sum(p.numel() * p.element_size() for p in params if p.requires_grad),
              optimizer_state_bytes, saved_activation_bytes)
    return dict(zip(MEMORY_PARTS, values, strict=True))
