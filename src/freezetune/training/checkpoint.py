"""Full training checkpoints: model, optimizer, progress and RNG state, written atomically.

``checkpoint.pt`` holds only tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``: loading it never runs code.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from freezetune.atomic import atomic_write
from freezetune.errors import WeightsError
from freezetune.models.weights import safe_torch_load
from freezetune.training.run_dir import CHECKPOINT_NAME
from freezetune.training.state import RunState


def rng_state() -> dict:
    """Captures every RNG freezetune's training touches."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Writes ``checkpoint.pt``; the previous checkpoint survives until the new one is complete.

    Args:
        run_dir: The run folder.
        model: The model (its full state dict is saved).
        optimizer: The optimizer (momentum buffers included).
        state: The run's position (step, epoch, batch in epoch, unfreeze phases).
        scaler: The fp16 gradient scaler, whose loss scale a resumed run continues from.

    Returns:
        The checkpoint path.
    """
    # The whole saved state, spelled out: weights, optimizer, RNG, and the run's position.
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        **state.as_dict(),
    }
    if scaler is not None:
        # Floats and ints only, so the checkpoint still loads with weights_only=True.
        payload["scaler"] = scaler.state_dict()
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint safely (``weights_only=True``).

    Raises:
        WeightsError: If the file is missing, is not a freezetune checkpoint, or is unsafe.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step"} <= set(ckpt):
        raise WeightsError(f"{path}: not a freezetune checkpoint (needs model, optimizer, step)")
    return ckpt


def _as_tuple(x):
    # weights_only loading turns Python's random state tuples into lists; random wants tuples.
    return tuple(_as_tuple(i) for i in x) if isinstance(x, list | tuple) else x
