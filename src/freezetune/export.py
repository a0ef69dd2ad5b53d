"""``freezetune export``: a run's base weights merged with its trainable-only checkpoint.

The checkpoint format itself (what is saved, the base hash, merging) is
:mod:`freezetune.training.trainable`; this module rebuilds the base a run started from and
writes the merged weights as one ``.safetensors`` file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from freezetune.atomic import atomic_write
from freezetune.config import load_config
from freezetune.errors import RunDirError, WeightsError
from freezetune.lock import hold
from freezetune.models.weights import build_model
from freezetune.training.trainable import META_KEY, Trainable, load_trainable, merge


def rebuild_base(run_dir: str | Path, trainable: Trainable, base: str | Path | None = None):
    """Rebuilds a run's starting model from its config, or from a given weights file.

    Mirrors :func:`freezetune.training.recipe.setup`: seed, then build the model, so a random-init base comes
    back bit for bit. The global torch RNG is left as it was.

    Returns:
        The :class:`freezetune.models.weights.LoadedModel`.

    Raises:
        RunDirError: If the run folder has no config.yaml.
        WeightsError: If the weights cannot be had or do not fit.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: no config.yaml (is this a freezetune run folder?)")
    cfg = load_config(run_dir / "config.yaml")
    if base is not None:
        weights = str(base)
        if not weights.endswith((".pth", ".pt", ".safetensors")):
            raise WeightsError(f"--base {weights}: expected a .pth, .pt or .safetensors file")
    else:
        source = trainable.manifest.get("weights_source", "random-init")
        weights = "none" if source == "random-init" else source
    model_cfg = cfg.model.model_copy(update={"weights": weights})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(model_cfg)


def export_run(
    run_dir: str | Path, out: str | Path, base: str | Path | None = None, overwrite: bool = False
) -> dict:
    """Merges a run's base weights with its trainable checkpoint and writes full weights.

    The result loads with ``model.weights: <out>``.

    Args:
        run_dir: The run folder.
        out: Destination ``.safetensors`` file.
        base: Weights file to use as the base instead of rebuilding it from the run's config.
        overwrite: Whether an existing ``out`` may be replaced.

    Returns:
        ``{"out", "bytes", "step", "base", "trainable_bytes", "tensors_from_checkpoint"}``.

    Raises:
        WeightsError: If the base does not match the checkpoint.
        RunDirError: If ``out`` exists (without ``overwrite``) or its folder does not.
        FolderLockedError: If another process writes ``out``'s folder (a run still training there).
        WriteError: If ``out`` cannot be written; no partial file is left.
    """
    from safetensors.torch import save

    out = Path(out)
    if out.suffix != ".safetensors":
        raise RunDirError(f"--out {out}: must end with .safetensors")
    if out.exists() and not overwrite:
        raise RunDirError(f"--out {out}: already exists; choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise RunDirError(f"--out {out}: folder {out.parent} does not exist")
    trainable = load_trainable(run_dir)
    loaded = rebuild_base(run_dir, trainable, base)
    desc = f"base {loaded.weights_source}"
    merged = merge(loaded.model.state_dict(), trainable, desc)
    m = trainable.manifest
    meta = {"model": m["model"], "num_classes": m["num_classes"], "step": m["step"],
            "exported_from": str(run_dir), "base": loaded.weights_source}
    data = save({n: t.contiguous() for n, t in merged.items()}, metadata={META_KEY: json.dumps(meta)})
    with hold(out.parent, "export", create=False):  # e.g. a run folder another process still trains into
        atomic_write(out, lambda f: f.write(data))
    return {"out": str(out), "bytes": len(data), "step": m["step"], "base": loaded.weights_source,
            "trainable_bytes": trainable.path.stat().st_size,
            "tensors_from_checkpoint": len(trainable.tensors)}
