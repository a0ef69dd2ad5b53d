"""Resuming a run: which overrides it may take, whether it has work left, and restoring its checkpoint."""

from __future__ import annotations

from pathlib import Path

from freezetune.config import Config
from freezetune.errors import ConfigError, RunDirError, WeightsError, first_line
from freezetune.training.checkpoint import load_checkpoint, set_rng_state
from freezetune.training.run_dir import CONFIG_NAME, RunDir
from freezetune.training.state import RunState

# What may differ between a run and its resumption: how long and where it trains, not what.
_FIXED_SECTIONS = ("seed", "model", "freeze", "adapt", "data", "optim", "output")


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """Loads a run folder's own config with overrides that may not change what was trained.

    Raises:
        ConfigError: If an override would change the model, freeze spec, data or seed.
        RunDirError: If the folder holds no resumable run.
    """
    folder = RunDir(run_dir)
    if not (folder / CONFIG_NAME).is_file() or not folder.has_checkpoint():
        raise RunDirError(f"{folder}: no config.yaml and checkpoint.pt to resume from")
    base = folder.config()
    config = folder.config(overrides)
    for section in _FIXED_SECTIONS:
        if getattr(base, section) != getattr(config, section):
            raise ConfigError(
                f"resume {folder}: overrides may not change {section} "
                "(only train.* and device may change when resuming)"
            )
    return config


def check_work_left(folder: RunDir, work_left: bool, step: int) -> None:
    """Refuses to "resume" a run that already completed (it would only rewrite its summary).

    A run killed after its last checkpoint but before its summary has work left: writing it.

    Raises:
        RunDirError: If the run has no steps left and its summary says it completed.
    """
    if work_left:
        return
    if folder.status() == "completed":
        raise RunDirError(
            f"{folder}: run already finished after {step} steps; "
            "to train longer, resume with a larger train.max_steps or train.epochs"
        )


def restore(folder: RunDir, controller, model, optimizer, scaler) -> RunState:
    """Puts a run back where its checkpoint left it: freeze changes, weights, optimizer, RNG, loss scale.

    The controller replays the freeze changes first, so the freeze state and the optimizer's
    param groups are exactly those the checkpoint was saved with. The weights are the
    checkpoint's tensors over its base file (verified against the checkpoint's sha256 before
    anything is loaded), or the full state dict of a first-format checkpoint; every tensor of
    the model must be there.

    Args:
        folder: The run folder.
        controller: The run's :class:`~freezetune.training.freeze_controller.FreezeController`.
        model: The model, built and frozen as at the start of the run.
        optimizer: Its optimizer, in its initial groups.
        scaler: The fp16 gradient scaler, or None.

    Returns:
        The run's position.

    Raises:
        WeightsError: If the checkpoint does not fit this run's model, its base file is missing
            or not the one it was saved with, or a stage frozen mid-run does not match its hash
            from then.
    """
    path = folder.checkpoint
    ckpt = load_checkpoint(path)  # "model" is the full state dict, the base merged in and verified
    try:
        state = RunState.from_checkpoint(ckpt)
        replayed = controller.load_state_dict(state.as_dict(), optimizer, folder.fingerprints())
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise WeightsError(f"{path}: checkpoint does not fit this run's model ({first_line(e)})") from None
    controller.check_replayed(replayed, path)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    if scaler is not None and ckpt.get("scaler"):
        # A resumed fp16 run continues with the loss scale it had reached, instead of
        # re-learning it from 65536 through a burst of skipped (overflowing) steps.
        scaler.load_state_dict(ckpt["scaler"])
    return state
