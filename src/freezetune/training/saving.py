"""What a run writes to resume and to export: ``checkpoint.pt`` at every save, its final weights once.

:class:`RunSaver` is the recipe's one writer of checkpoints. A save writes ``checkpoint.pt``:
what can change, the optimizer, the RNG and the run's position, over the frozen base written once
(``base.safetensors``). The trainable-only file, the run's result for ``export``, is written when
the run ends (:meth:`RunSaver.finish`); until then ``checkpoint.pt`` records what export needs to
read it instead. Only rank 0 writes; every rank holds the same weights.
"""

from __future__ import annotations

import torch

from freezetune.atomic import settle
from freezetune.config import Config
from freezetune.errors import WriteError
from freezetune.models.weights import LoadedModel
from freezetune.training.checkpoint import save_checkpoint
from freezetune.training.events import Progress
from freezetune.training.freeze_controller import FreezeController
from freezetune.training.run_dir import RunDir
from freezetune.training.state import RunState
from freezetune.training.trainable import base_hashes, checkpoint_manifest, save_trainable, trainable_manifest


class RunSaver:
    """Writes one run's checkpoints, and says which one survives a write fault.

    Args:
        config: The run's config.
        run_dir: Its folder.
        freeze: Its freeze controller (what is frozen now, and the hashes from when it froze).
        loaded: The model and where its starting weights came from.
        optimizer: The optimizer whose state a checkpoint holds.
        progress: Where the newest checkpoint's step is kept (``saved_step``).
        is_main: Whether this process writes (rank 0).
    """

    def __init__(self, config: Config, run_dir: RunDir, freeze: FreezeController, loaded: LoadedModel,
                 optimizer: torch.optim.Optimizer, progress: Progress, is_main: bool):
        self.config, self.run_dir, self.freeze, self.loaded = config, run_dir, freeze, loaded
        self.optimizer, self.progress, self.is_main = optimizer, progress, is_main

    def save(self, state: RunState, scaler: torch.amp.GradScaler | None) -> None:
        """Writes ``checkpoint.pt`` for ``state``; the base the first time.

        The write is atomic and the base goes first, so a crash at any moment leaves a checkpoint
        whose base is beside it. A frozen tensor never changes, so after the first save only what
        trains is written again.
        """
        if not self.is_main:
            return
        controller = self.freeze.state_dict()
        state.phases, state.auto_freeze = controller["phases"], controller["auto_freeze"]
        # The base is what is frozen now, hashed as it was before training (a layer unfrozen or
        # frozen mid-run is saved with the trainable tensors instead).
        base = base_hashes(self.freeze.model, self.freeze.base_plan(), self.freeze.frozen_before)
        save_checkpoint(self.run_dir.path, self.freeze.model, self.optimizer, state, scaler, base,
                        checkpoint_manifest(self.trainable(state.step)[1]))
        self.progress.saved_step = state.step

    def finish(self, step: int, weights: bool) -> None:
        """Ends the run's writing: the final weights (when ``weights``), then waits until every file is on the disk.

        Raises:
            WriteError: If a file cannot be written; its message says which checkpoint survived.
        """
        try:
            if weights and self.is_main:
                save_trainable(self.run_dir.path, *self.trainable(step))
            settle()
        except WriteError as e:
            raise e.with_hint(self.hint() + (" (it writes the final weights)" if weights else "")) from e

    def trainable(self, step: int) -> tuple[dict, dict]:
        """The trainable-only checkpoint's tensors and manifest at ``step``, the base being what is frozen now."""
        cfg = self.config
        return trainable_manifest(
            self.freeze.model, self.freeze.base_plan(), base=self.freeze.base_sha256(), step=step,
            model_name=cfg.model.name, num_classes=cfg.model.num_classes,
            weights_source=self.loaded.weights_source, seed=cfg.seed,
        )

    def hint(self) -> str:
        """What to do after a write fault: which checkpoint survived, and the command that continues from it."""
        saved = self.progress.saved_step
        if saved is None:
            return "no checkpoint had been saved yet: start the run again (output.overwrite=true reuses this folder)"
        return (f"the checkpoint of step {saved} is intact; once the folder can be written again, "
                f"`freezetune train --resume {self.run_dir}` continues from it")
