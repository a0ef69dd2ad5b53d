"""Trainable-only checkpoints, and merging them with their base into full weights.

A frozen layer never changes, so saving it again at every checkpoint only repeats the starting
weights. ``checkpoint.trainable.safetensors`` holds just the tensors that can change (trainable
parameters, plus the buffers of every BatchNorm layer that is in training mode) together with the
sha256 of everything it leaves out: the frozen *base*. Merging refuses a base whose frozen tensors
hash differently, so a checkpoint can never be silently combined with the wrong weights.

The manifest travels inside the safetensors header (so the file is self-describing and written in
one atomic rename); ``checkpoint.trainable.json`` is a readable copy for people and tools.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from freezetune.atomic import atomic_write, write_json
from freezetune.errors import WeightsError, first_line
from freezetune.freezing.integrity import combined_sha256, frozen_state, tensor_sha256
from freezetune.freezing.plan import FreezePlan
from freezetune.training.run_dir import BASE_NAME, CHECKPOINT_NAME, TRAINABLE_NAME
from freezetune.training.run_dir import TRAINABLE_MANIFEST_NAME as MANIFEST_NAME

FORMAT = "freezetune-trainable/1"
META_KEY = "freezetune"


@dataclass
class Trainable:
    """A loaded trainable-only checkpoint.

    Attributes:
        tensors: Name -> tensor, for exactly the tensors that were saved.
        manifest: What the header says: model, num_classes, step, base_sha256, ...
        path: The file it came from.
    """

    tensors: dict[str, torch.Tensor]
    manifest: dict
    path: Path


# --------------------------------------------------------------------------------------------
# saving


def trainable_state(model: nn.Module, plan: FreezePlan) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Splits off the tensors that training can change.

    Everything in the state dict except the frozen tensors of :func:`freeze.frozen_state` (frozen
    parameters and the buffers of frozen BatchNorm layers): trainable parameters, buffers of
    BatchNorm layers that train, and, with ``batchnorm: train``, the running statistics of
    BatchNorm layers whose affine parameters are frozen.

    Returns:
        The tensors (detached, where they are), and the names among them that are buffers of
        BatchNorm layers with frozen parameters.
    """
    frozen = set(frozen_state(model, plan))
    state = model.state_dict()
    tensors = {n: t.detach() for n, t in state.items() if n not in frozen}
    frozen_params = set(plan.frozen)
    frozen_bn_buffers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if params and all(p in frozen_params for p in params):
            frozen_bn_buffers += [
                f"{name}.{b}" for b, _ in module.named_buffers(recurse=False) if f"{name}.{b}" in tensors
            ]
    return tensors, sorted(frozen_bn_buffers)


def base_sha256(state: dict[str, torch.Tensor], saved: set[str] | list[str]) -> str:
    """The sha256 of the base: every tensor of ``state`` that the trainable checkpoint leaves out.

    For a model trained with plan ``p`` this equals
    ``combined_sha256(fingerprint(model, p))``, the digest the run's freeze-integrity check uses.
    """
    saved = set(saved)
    return combined_sha256({n: tensor_sha256(t) for n, t in state.items() if n not in saved})


def base_hashes(model: nn.Module, plan: FreezePlan, frozen_before: dict[str, str]) -> dict[str, str]:
    """Name -> sha256 of each tensor of the base: what ``plan`` freezes, hashed as it froze.

    The base ``checkpoint.pt`` leaves to ``base.safetensors``; its combined digest is
    :meth:`FreezeController.base_sha256` (a tensor missing from ``frozen_before`` is hashed now).

    Args:
        model: The model being trained.
        plan: The base plan (:meth:`FreezeController.base_plan`).
        frozen_before: The run's hashes of its frozen tensors (:attr:`FreezeController.frozen_before`).
    """
    return {n: frozen_before.get(n) or tensor_sha256(t) for n, t in frozen_state(model, plan).items()}


def trainable_manifest(model: nn.Module, plan: FreezePlan, *, base: str, step: int, model_name: str,
                       num_classes: int, weights_source: str, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors a trainable-only checkpoint holds, and its manifest.

    Args:
        model: The model being trained.
        plan: Its freeze plan.
        base: sha256 of the frozen base, ``combined_sha256(fingerprint(model, plan))`` taken
            before training.
        step: Optimizer steps taken.
        model_name: torchvision model name.
        num_classes: Width of the head.
        weights_source: Where the starting weights came from (``random-init``, ``imagenet`` or a
            path), so that export can rebuild the base.
        seed: The run seed (a random-init base is rebuilt from it).

    Returns:
        The tensors (detached, where they are) and the manifest the file's header carries.
    """
    tensors, frozen_bn_buffers = trainable_state(model, plan)
    manifest = {
        "format": FORMAT,
        "model": model_name,
        "num_classes": num_classes,
        "step": step,
        "base_sha256": base,
        "weights_source": weights_source,
        "seed": seed,
        "batchnorm": plan.batchnorm,
        "tensors": sorted(tensors),
        "frozen_bn_buffers": frozen_bn_buffers,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    return tensors, manifest


def save_trainable(run_dir: str | Path, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Atomically writes ``checkpoint.trainable.safetensors`` and its JSON manifest.

    A run writes it when it ends (completed, pruned, interrupted or stopped on a non-finite
    loss): it is the run's final weights for export, while ``checkpoint.pt`` is what a run
    resumes from, written every epoch. A run killed before it ended has only the checkpoint;
    :func:`load_trainable` then reads the same tensors and manifest from there.

    Args:
        run_dir: The run folder.
        tensors: The tensors, as :func:`trainable_manifest` gives them.
        manifest: Their manifest, likewise.

    Returns:
        The safetensors path.
    """
    from safetensors.torch import save

    tensors = {n: t.to("cpu").contiguous() for n, t in tensors.items()}
    data = save(tensors, metadata={META_KEY: json.dumps(manifest)})
    path = Path(run_dir) / TRAINABLE_NAME
    atomic_write(path, lambda f: f.write(data))
    readable = {**manifest, "file": TRAINABLE_NAME, "file_bytes": len(data),
                "file_sha256": hashlib.sha256(data).hexdigest()}
    write_json(Path(run_dir) / MANIFEST_NAME, readable)
    return path


def checkpoint_sizes(run_dir: str | Path) -> dict:
    """Sizes in bytes of the run's ``checkpoint.pt``, its frozen base and the trainable-only checkpoint.

    ``full_bytes`` is checkpoint.pt's own size: since format 2 it leaves the frozen base to
    ``base.safetensors`` (``base_bytes``), written once. None where a file is absent.
    """
    def size(name: str) -> int | None:
        p = Path(run_dir) / name
        return p.stat().st_size if p.is_file() else None

    return {"full_bytes": size(CHECKPOINT_NAME), "trainable_bytes": size(TRAINABLE_NAME), "base_bytes": size(BASE_NAME)}


# --------------------------------------------------------------------------------------------
# loading and merging


def load_trainable(path: str | Path) -> Trainable:
    """Reads a trainable-only checkpoint: a run folder's latest, or a given ``.safetensors`` file.

    A run folder gives its latest weights: ``checkpoint.trainable.safetensors`` (written when the
    run ended) unless its ``checkpoint.pt`` holds a later step (a run killed before it ended, or
    continued since); the same tensors and manifest are then read from the checkpoint
    . Nothing is unpickled: safetensors holds raw tensor
    bytes and a JSON header, and the checkpoint loads with ``weights_only=True``.

    Raises:
        WeightsError: If the file is missing, not safetensors, or has no freezetune manifest.
    """
    path = Path(path)
    if not path.is_dir():
        return _read_file(path)
    file, checkpoint = path / TRAINABLE_NAME, path / CHECKPOINT_NAME
    saved = _read_file(file) if file.is_file() else None
    if checkpoint.is_file():
        ckpt = _load_checkpoint(checkpoint)
        if saved is None or ckpt.get("step", -1) > saved.manifest["step"]:
            return _from_checkpoint(ckpt, checkpoint)
    if saved is None:
        raise WeightsError(f"{file}: trainable checkpoint not found")
    return saved


# What checkpoint.pt keeps of the trainable manifest; format, step and tensors follow from the
# checkpoint itself.
CHECKPOINT_MANIFEST_KEYS = ("model", "num_classes", "base_sha256", "weights_source", "seed", "batchnorm",
                            "frozen_bn_buffers")


def checkpoint_manifest(manifest: dict) -> dict:
    """What ``checkpoint.pt`` keeps of a trainable manifest (:data:`CHECKPOINT_MANIFEST_KEYS`)."""
    return {k: manifest[k] for k in CHECKPOINT_MANIFEST_KEYS}


def _load_checkpoint(path: Path) -> dict:
    from freezetune.models.weights import safe_torch_load

    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    # Memory-mapped: the step is read without reading the tensors, which only export touches.
    ckpt = safe_torch_load(path, "checkpoint", mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise WeightsError(f"{path}: not a freezetune checkpoint (needs model and step)")
    return ckpt


def _from_checkpoint(ckpt: dict, path: Path) -> Trainable:
    known = ckpt.get("trainable")
    if not isinstance(known, dict) or not set(CHECKPOINT_MANIFEST_KEYS) <= set(known):
        raise WeightsError(f"{path}: written by an older freezetune, it does not record how its tensors were "
                           f"trained; finish the run (freezetune train --resume {path.parent}) to write "
                           f"{TRAINABLE_NAME}")
    tensors = ckpt["model"]
    manifest = {"format": FORMAT, **{k: known[k] for k in CHECKPOINT_MANIFEST_KEYS}, "step": int(ckpt["step"]),
                "tensors": sorted(tensors), "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    return Trainable(tensors, manifest, path)


def _read_file(path: Path) -> Trainable:
    if not path.is_file():
        raise WeightsError(f"{path}: trainable checkpoint not found")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    try:
        manifest = json.loads(meta[META_KEY])
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: not a freezetune trainable checkpoint ({first_line(e)})") from None
    return Trainable(tensors, manifest, path)


def merge(base: dict[str, torch.Tensor], trainable: Trainable, base_desc: str = "the base") -> dict:
    """Combines a base state dict with a trainable checkpoint into full weights.

    Args:
        base: Full state dict of the starting model (frozen tensors as they were before training).
        trainable: The loaded trainable checkpoint.
        base_desc: How to name the base in error messages.

    Returns:
        A new state dict: the base with every saved tensor replaced.

    Raises:
        WeightsError: If the base lacks a saved tensor, shapes differ, or the base's frozen
            tensors are not the ones the checkpoint was trained on.
    """
    src = trainable.path
    missing = [n for n in trainable.tensors if n not in base]
    if missing:
        raise WeightsError(f"{src}: {base_desc} has no tensor {missing[0]} ({len(missing)} missing)")
    wrong = [n for n, t in trainable.tensors.items() if t.shape != base[n].shape]
    if wrong:
        n = wrong[0]
        raise WeightsError(
            f"{src}: {n} is {tuple(trainable.tensors[n].shape)} but {tuple(base[n].shape)} in {base_desc}"
        )
    got = base_sha256(base, trainable.tensors)
    want = trainable.manifest["base_sha256"]
    if got != want:
        raise WeightsError(
            f"{src}: refusing to load onto a different base: its frozen weights have sha256 "
            f"{got[:12]}..., but this checkpoint was trained on {want[:12]}... "
            "(pass the weights the run started from)"
        )
    merged = {n: t.detach().to("cpu") for n, t in base.items()}
    for n, t in trainable.tensors.items():
        merged[n] = t.to(base[n].dtype)
    return merged


def load_into(model: nn.Module, path: str | Path) -> Trainable:
    """Loads a trainable checkpoint into ``model``, which must hold the run's base weights.

    Raises:
        WeightsError: If ``model``'s frozen weights are not the checkpoint's base.
    """
    trainable = load_trainable(path)
    model.load_state_dict(merge(model.state_dict(), trainable, "the model"))
    return trainable

