"""What a run tells whoever watches it: the events a console (or a test) can subscribe to."""

from __future__ import annotations


class Reporter:
    """Receives progress events; subclass it to print. Every method is optional."""

    def setup_done(self, run) -> None:
        """Called once, with the :class:`~freezetune.training.recipe.Recipe` just set up."""

    def train_start(self, total_steps: int, start_step: int) -> None:  # noqa: D102
        pass

    def step(self, record: dict) -> None:  # noqa: D102
        pass

    def validation(self, epoch: int, result: dict) -> None:  # noqa: D102
        pass

    def message(self, text: str) -> None:  # noqa: D102
        pass

    def train_end(self) -> None:  # noqa: D102
        pass
