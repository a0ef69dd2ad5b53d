"""Which device a run uses, and how to name it in results."""

from __future__ import annotations

import torch

from freezetune.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """Turns ``auto``/``cpu``/``cuda``/``cuda:N`` into a usable device.

    Raises:
        DeviceError: If CUDA (or that CUDA index) is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def device_description(device: torch.device) -> str:
    """A short human-readable name for the device, e.g. ``cuda:0 (NVIDIA H100)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"
