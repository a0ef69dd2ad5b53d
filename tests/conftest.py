"""Shared fixtures: tiny, fast configs (32 px, a handful of images, random init, offline)."""

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


@pytest.fixture
def tiny(tmp_path):
    """Returns a function building a tiny validated Config (extra overrides as keyword dict)."""
    from freezetune.config import load_config

    def make(path=None, **extra):
        extra = {k.replace("__", "."): v for k, v in extra.items()}
        return load_config(path, tiny_overrides(tmp_path / "run", **extra))

    return make
