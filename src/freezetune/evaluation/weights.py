"""Which weights ``freezetune evaluate`` loads: the run's checkpoint, its trainable-only file, or a weights file.

Every tensor of the run's architecture is loaded strictly (a partly loaded model would evaluate
garbage); weights exported from another model are refused naming both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from freezetune.config import Config
from freezetune.errors import RunDirError, WeightsError, first_line
from freezetune.export import merged_model
from freezetune.freezing.plan import apply_freeze
from freezetune.models.lora import is_lora_parameter
from freezetune.models.weights import build_model, read_weights_file, safe_torch_load
from freezetune.training.checkpoint import CHECKPOINT_NAME, full_model_state
from freezetune.training.trainable import FORMAT, META_KEY, TRAINABLE_NAME


@dataclass
class Weights:
    """The model to evaluate and where its weights came from."""

    model: nn.Module
    path: Path
    kind: str  # checkpoint | trainable | weights
    step: int | None


def load_weights(run_dir: Path, cfg: Config, checkpoint: str | Path | None = None) -> Weights:
    """The run's model with the weights to evaluate; default its checkpoint.pt, else its trainable checkpoint.

    Raises:
        RunDirError: If there is no checkpoint to evaluate.
        WeightsError: If the file cannot be read or does not fit the run's model.
    """
    path = Path(checkpoint) if checkpoint is not None else _default_checkpoint(run_dir)
    if not path.is_file():
        raise WeightsError(f"--checkpoint {path}: file not found")
    if path.suffix == ".safetensors":
        meta = _safetensors_meta(path)
        if meta.get("format") == FORMAT:  # a trainable-only checkpoint: merged with the run's base
            model, info = merged_model(run_dir, trainable_file=path)
            return Weights(model, path, "trainable", info["step"])
        _check_meta(meta, cfg, path)
        state, step, kind = read_weights_file(path), meta.get("step"), "weights"
    elif path.suffix in (".pt", ".pth"):
        state, step, kind = _torch_file(path)
    else:
        raise WeightsError(f"--checkpoint {path}: expected a .pt, .pth or .safetensors file")
    model = _architecture(cfg, lora=any(is_lora_parameter(k) for k in state))
    _load_strict(model, state, path)
    return Weights(model, path, kind, step)


def _default_checkpoint(run_dir: Path) -> Path:
    for name in (CHECKPOINT_NAME, TRAINABLE_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    raise RunDirError(f"{run_dir}: no {CHECKPOINT_NAME} or {TRAINABLE_NAME}; pass --checkpoint PATH")


def _architecture(cfg: Config, lora: bool = False) -> nn.Module:
    """The run's network with its head, randomly initialised (every tensor is then loaded).

    With ``lora``, peft's adapters too, as the run trained them (a checkpoint of an
    ``adapt.method: lora`` run; its exported weights have them merged, and load without).
    """
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model.model_copy(update={"weights": "none"})).model
        if lora:
            apply_freeze(model, cfg.freeze, cfg.model.name, cfg.adapt)
        return model


def _safetensors_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    try:
        found = json.loads(meta[META_KEY])
    except (KeyError, ValueError, TypeError):
        return {}  # weights written by another tool: the strict load decides
    return found if isinstance(found, dict) else {}


def _check_meta(meta: dict, cfg: Config, path: Path) -> None:
    """Refuses weights exported from another model, naming both (before a load error would)."""
    model, classes = meta.get("model"), meta.get("num_classes")
    if (model and model != cfg.model.name) or (classes and classes != cfg.model.num_classes):
        raise WeightsError(f"{path}: weights of {model} with {classes} classes, but the run is "
                           f"{cfg.model.name} with {cfg.model.num_classes}")


def _torch_file(path: Path) -> tuple[dict, int | None, str]:
    """A freezetune checkpoint.pt (full weights, base merged in; step) or a plain state dict, loaded without code."""
    obj = safe_torch_load(path, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        step = obj.get("step")
        return full_model_state(obj, path), step if isinstance(step, int) else None, "checkpoint"
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a checkpoint or state dict (expected a mapping of names to tensors)")
    return obj, None, "weights"


def _load_strict(model: nn.Module, state: dict, path: Path) -> None:
    """Loads every tensor or refuses with one line: a partly loaded model would evaluate garbage."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    problems = [f"{what}: {few(names, 3)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if names]
    if problems:
        raise WeightsError(f"{path}: does not fit the run's model; " + "; ".join(problems))
    model.load_state_dict(state)


def few(names: list[str], n: int = 5) -> str:
    """The first ``n`` names, and how many more there are."""
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
