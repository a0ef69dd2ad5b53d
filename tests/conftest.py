"""Shared fixtures: tiny, fast configs (32 px, a handful of images, random init, offline).

``tiny`` builds a validated Config (``tiny_at`` the same for a given folder, ``tiny_yaml`` writes it
to a file) and ``tiny_args`` gives the same settings as command-line overrides;
both take extra overrides as keywords, ``__`` standing for ``.`` (``train__max_steps=3``).
``resnet18`` is a randomly initialised ResNet18 with 10 classes; ``cli`` runs the command line
in-process. ``tiny_overrides`` stays importable as a plain function.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FREEZETUNE_OFFLINE", "1")  # never try the network from tests


def tiny_overrides(out_dir, **extra) -> list[str]:
    """Overrides that make any config run in about a second on a CPU."""
    values = {
        "model.weights": "none",
        "data.image_size": 32,
        "data.batch_size": 4,
        "data.train_size": 16,
        "data.val_size": 8,
        "train.epochs": 1,
        "train.warmup_steps": 1,
        "output.dir": str(out_dir),
        "device": "cpu",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _dotted(extra: dict) -> dict:
    return {k.replace("__", "."): v for k, v in extra.items()}


@pytest.fixture(scope="session")
def tiny_at():
    """Returns ``make(out_dir, path=None, **extra)``: a tiny validated Config writing to ``out_dir``.

    Session-scoped, for module-scoped fixtures that share one run (``tiny`` is the usual choice).
    """
    from freezetune.config import load_config

    def make(out_dir, path=None, **extra):
        return load_config(path, tiny_overrides(out_dir, **_dotted(extra)))

    return make


@pytest.fixture
def tiny(tmp_path, tiny_at):
    """Returns a function building a tiny validated Config (extra overrides as keyword dict)."""

    def make(path=None, **extra):
        return tiny_at(tmp_path / "run", path, **extra)

    return make


@pytest.fixture
def tiny_yaml(tmp_path, tiny):
    """Returns ``make(**extra)``: writes the tiny config to ``tmp_path / "cfg.yaml"`` for CLI tests."""
    from freezetune.config import dump_config

    def make(**extra):
        path = tmp_path / "cfg.yaml"
        path.write_text(dump_config(tiny(**extra)))
        return path

    return make


@pytest.fixture
def tiny_args(tmp_path):
    """Returns a function giving the tiny overrides as ``key=value`` arguments for the command line.

    ``tiny_args(out_dir=None, **extra)``: the run goes to ``out_dir`` (default ``tmp_path / "run"``,
    where ``tiny`` puts it too).
    """

    def make(out_dir=None, **extra):
        return tiny_overrides(tmp_path / "run" if out_dir is None else out_dir, **_dotted(extra))

    return make


@pytest.fixture
def resnet18():
    """A ResNet18 with random init (seed 0) and a 10-class head, built as freezetune builds it."""
    import torch

    from freezetune.config import ModelConfig
    from freezetune.models.weights import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(name="resnet18", num_classes=10, weights="none")).model


@pytest.fixture
def cli():
    """Returns a function running ``freezetune <args>`` in-process; it returns Typer's Result.

    Arguments may be paths or numbers (they are passed as strings); ``result.stdout`` and
    ``result.stderr`` are kept apart.
    """
    from typer.testing import CliRunner

    from freezetune.cli import app

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
