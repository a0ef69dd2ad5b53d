"""Training checkpoints: what can change, optimizer, progress and RNG state, written atomically.

``checkpoint.pt`` (format ``freezetune-checkpoint/2``) leaves out the frozen *base*: those tensors
never change, so they are written once per run to ``base.safetensors`` beside it, and the
checkpoint holds their sha256 instead (the digest :func:`trainable.base_sha256` gives). Its keys:

- ``format``: ``freezetune-checkpoint/2``; a checkpoint without it is the first format, whose
  ``model`` is the full state dict (still read everywhere);
- ``model``: every tensor of the state dict that is not in the base file (the whole state dict
  when nothing is frozen);
- ``base``: ``{"file": "base.safetensors", "sha256": ..., "tensors": n}``, or None when nothing is
  frozen;
- ``optimizer``, ``rng``, the :class:`RunState` counters, and ``scaler`` for fp16;
- ``trainable``: what the trainable-only checkpoint's manifest says of the run (model, classes,
  base sha256, weights source, seed, BatchNorm policy), so that ``export`` reads a run killed
  before it ended from here (that file is written only when a run ends).

It holds only tensors and plain containers, so it loads with ``torch.load(..., weights_only=True)``:
loading it never runs code. :func:`load_checkpoint` and :func:`full_model_state` give the full
state dict from either format, the base verified against its hash.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn

from freezetune.atomic import atomic_write
from freezetune.errors import WeightsError
from freezetune.freezing.integrity import combined_sha256, tensor_sha256
from freezetune.models.weights import (
    BASE_FORMAT,
    BASE_META_KEY,
    CHECKPOINT_FORMAT,
    checkpoint_model_state,
    read_base_header,
    safe_torch_load,
)
from freezetune.training.run_dir import BASE_NAME, CHECKPOINT_NAME
from freezetune.training.state import RunState

FORMAT = CHECKPOINT_FORMAT


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
    base: dict[str, str] | None = None,
    trainable: dict | None = None,
) -> Path:
    """Writes ``checkpoint.pt``; the previous checkpoint survives until the new one is complete.

    The base file goes first (when it is not already there), so a crash at any moment leaves a
    checkpoint.pt whose base is beside it.

    Args:
        run_dir: The run folder.
        model: The model.
        optimizer: The optimizer (momentum buffers included).
        state: The run's position (step, epoch, batch in epoch, unfreeze phases).
        scaler: The fp16 gradient scaler, whose loss scale a resumed run continues from.
        base: The frozen base: name -> sha256 (as hashed when it froze) of each tensor left to
            ``base.safetensors`` (:func:`trainable.base_hashes`); None or empty when nothing is
            frozen, and the checkpoint then holds every tensor.
        trainable: What the trainable-only checkpoint's manifest says of the run
            (:func:`trainable.checkpoint_manifest`), so that a run killed before it ended can be
            exported from this file.

    Returns:
        The checkpoint path.

    Raises:
        WriteError: If a file cannot be written (the previous pair is left as it was).
    """
    ref = write_base(run_dir, model, base) if base else None
    tensors = model.state_dict()
    if base:
        # What trainable_state keeps: everything but the base (tensors unfrozen since the base
        # file was written are in both, and the checkpoint's copy wins on loading).
        tensors = {n: t for n, t in tensors.items() if n not in base}
    # The whole saved state, spelled out: tensors, base, optimizer, RNG, and the run's position.
    payload = {
        "format": FORMAT,
        "model": tensors,
        "base": ref,
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "trainable": trainable,
        **state.as_dict(),
    }
    if scaler is not None:
        # Floats and ints only, so the checkpoint still loads with weights_only=True.
        payload["scaler"] = scaler.state_dict()
    path = Path(run_dir) / CHECKPOINT_NAME
    # In place as soon as it is written, so a killed process keeps it; its fsync goes on while
    # training does (atomic.settle waits for it, as every run's end does).
    atomic_write(path, lambda f: torch.save(payload, f), sync="background")
    return path


def write_base(run_dir: Path, model: nn.Module, base: dict[str, str]) -> dict:
    """Writes ``base.safetensors`` unless the one there already holds ``base``; returns the reference to it.

    The file there is kept when it holds every tensor of ``base`` with the same hash (a phase
    that unfroze tensors since leaves it a superset, which the checkpoint overrides), so it is
    written once per run: only its header is read to tell.

    Args:
        run_dir: The run folder.
        model: The model, whose tensors named in ``base`` are written.
        base: Name -> sha256 of the base's tensors.

    Returns:
        ``{"file", "sha256", "tensors"}``: what checkpoint.pt records of its base.
    """
    path = Path(run_dir) / BASE_NAME
    header = read_base_header(path) if path.is_file() else None
    if header is None or not _holds(header["hashes"], base, model):
        header = _write_base_file(path, model, base)
    return {"file": BASE_NAME, "sha256": header["sha256"], "tensors": len(header["hashes"])}


def _holds(saved: dict, base: dict[str, str], model: nn.Module) -> bool:
    """Whether a base file with tensor hashes ``saved`` serves ``base`` for ``model``."""
    names = set(model.state_dict())
    return all(saved.get(n) == h for n, h in base.items()) and set(saved) <= names


def _write_base_file(path: Path, model: nn.Module, base: dict[str, str]) -> dict:
    from safetensors.torch import save

    state = model.state_dict()
    # Copies: safetensors refuses tensors that share memory, and the file must hold these bytes.
    tensors = {n: state[n].detach().to("cpu", copy=True).contiguous() for n in sorted(base)}
    hashes = {n: tensor_sha256(t) for n, t in tensors.items()}  # of the bytes written, not as expected
    header = {"format": BASE_FORMAT, "sha256": combined_sha256(hashes), "hashes": hashes}
    data = save(tensors, metadata={BASE_META_KEY: json.dumps(header)})
    atomic_write(path, lambda f: f.write(data))
    return header


def base_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of a base's tensors, as checkpoint.pt records it (``trainable.base_sha256``'s digest)."""
    return combined_sha256({n: tensor_sha256(t) for n, t in tensors.items()})


def full_model_state(ckpt: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict of a loaded ``checkpoint.pt`` of either format.

    The first format holds it whole; format 2 is merged with the base file beside ``path``,
    whose tensors are hashed and must give the sha256 the checkpoint recorded.

    Args:
        ckpt: The checkpoint as ``torch.load`` returned it.
        path: The file it came from.

    Raises:
        WeightsError: If the base file is missing, unreadable or not the checkpoint's base.
    """
    return checkpoint_model_state(ckpt, path, digest=base_digest)


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint safely (``weights_only=True``), its ``model`` the full state dict.

    A checkpoint of format 2 gets its base merged in (:func:`full_model_state`); ``format`` and
    ``base`` are left in the result as they were on disk.

    Raises:
        WeightsError: If the file is missing, is not a freezetune checkpoint, is unsafe, or its
            base file is missing or not the one it was saved with.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step"} <= set(ckpt):
        raise WeightsError(f"{path}: not a freezetune checkpoint (needs model, optimizer, step)")
    ckpt["model"] = full_model_state(ckpt, path)
    return ckpt


def _as_tuple(x):
    # weights_only loading turns Python's random state tuples into lists; random wants tuples.
    return tuple(_as_tuple(i) for i in x) if isinstance(x, list | tuple) else x
