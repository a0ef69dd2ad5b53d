"""Full training checkpoints: model, optimizer, progress and RNG state, written atomically.

``checkpoint.pt`` holds only tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``: loading it never runs code.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from torch import nn

from freezetune.errors import WeightsError
from freezetune.training.run_dir import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


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
    progress: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Writes ``checkpoint.pt``; the previous checkpoint survives until the new one is complete.

    Args:
        run_dir: The run folder.
        model: The model (its full state dict is saved).
        optimizer: The optimizer (momentum buffers included).
        progress: ``step``, ``epoch``, ``batch_in_epoch`` and anything else small and plain.
        scaler: The fp16 gradient scaler, whose loss scale a resumed run continues from.

    Returns:
        The checkpoint path.
    """
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        **progress,
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


def safe_torch_load(path: Path, what: str = "weights"):
    """``torch.load(..., weights_only=True)``: tensors and plain containers only, never code.

    Args:
        path: A ``.pt``/``.pth`` file.
        what: What the file should be, for the error message (``weights``, ``checkpoint``).

    Raises:
        WeightsError: One line saying why the file was refused or could not be read.
    """
    try:
        with warnings.catch_warnings():
            # torch warns about e.g. pickle protocols right before failing; the error says it all.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and weights_only errors share no base class
        text = str(e)
        if "WeightsUnpickler error" in text:
            after = text.split("WeightsUnpickler error:", 1)[1]
            detail = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
            detail = detail.split(" was not an allowed global")[0][:120]
            if "global" in detail.lower():
                raise WeightsError(
                    f"{path}: refused: unpickling it would call code ({detail}); freezetune "
                    "loads with weights_only=True and never runs pickled code; re-save it as a state "
                    "dict of tensors or as .safetensors"
                ) from None
            raise WeightsError(
                f"{path}: not a {what} file written by torch.save "
                f"(weights_only=True loading stopped at: {detail})"
            ) from None
        first = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{path}: cannot load {what} safely with weights_only=True ({first})") from None


def _as_tuple(x):
    # weights_only loading turns Python's random state tuples into lists; random wants tuples.
    return tuple(_as_tuple(i) for i in x) if isinstance(x, list | tuple) else x
