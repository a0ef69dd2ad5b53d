"""Shared fixtures: tiny, fast configs (32 px, a handful of images, random init, offline).

``tiny`` builds a validated Config (``tiny_at`` the same for a given folder, ``tiny_yaml`` writes it
to a file) and ``tiny_args`` gives the same settings as command-line overrides;
both take extra overrides as keywords, ``__`` standing for ``.`` (``train__max_steps=3``).
``resnet18`` is a randomly initialised ResNet18 with 10 classes; ``cli`` runs the command line
in-process. ``tiny_overrides`` and ``wait_for_file`` stay importable as plain functions.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FREEZETUNE_OFFLINE", "1")  # never try the network from tests
# The suite runs on two xdist workers (pyproject's addopts): one torch thread each, so that they
# share two cores without oversubscribing them. Set before torch is imported, and inherited by
# the subprocesses tests start, so a subprocess computes with the same threads as its test.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """Puts the modules marked ``heavy`` first, heaviest first, the rest in their usual order.

    With ``--dist loadscope`` a worker takes a whole module at a time; a long module taken last
    would leave the other worker idle while it runs.
    """

    def seconds(item):
        mark = item.get_closest_marker("heavy")
        return -mark.args[0] if mark else 0

    items.sort(key=seconds)  # stable: the tests of a module keep their order


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


def wait_for_file(path, proc, timeout: float = 120, poll: float = 0.005) -> None:
    """Waits until ``path`` exists, failing if the process ``proc`` exits first or ``timeout`` seconds pass.

    For tests that act on a running ``freezetune`` subprocess at a known point (a checkpoint on disk).
    """
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {os.path.basename(path)} within {timeout:g} s"
        time.sleep(poll)


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


class _DiskBudget:
    """Bytes a fake disk still takes; the write that crosses it writes what fits, then fails like a full disk."""

    def __init__(self, folder, free: int, error: int):
        self.folder, self.free, self.error, self.failures = str(folder), free, error, 0

    def covers(self, path) -> bool:
        return os.path.realpath(path).startswith(os.path.realpath(self.folder) + os.sep)

    def take(self, f, data):
        if len(data) <= self.free:
            self.free -= len(data)
            return f.write(data)
        fits, self.free = data[: self.free], 0
        f.write(fits)
        f.flush()
        self.failures += 1
        raise OSError(self.error, os.strerror(self.error))


class _Faulty:
    """A file object whose writes draw on a :class:`_DiskBudget`; everything else is the real file's."""

    def __init__(self, f, budget: _DiskBudget):
        self._f, self._budget = f, budget

    def write(self, data):
        return self._budget.take(self._f, data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def full_disk(monkeypatch):
    """Returns ``fill(folder, free, error=errno.ENOSPC)``: writes under ``folder`` fail after ``free`` bytes.

    It patches the two ways freezetune writes files: the temp files of :func:`freezetune.atomic.atomic_write`
    (``os.fdopen``) and the metrics logs (``open`` in :mod:`freezetune.training.run_dir`). The returned
    budget has ``free`` (bytes left, settable) and ``failures``.
    """
    import builtins
    import errno

    from freezetune.training import run_dir

    budgets = []
    real_fdopen, real_open = os.fdopen, builtins.open

    def covering(path):
        return next((b for b in budgets if b.covers(path)), None)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        budget = covering(os.readlink(f"/proc/self/fd/{fd}"))
        return f if budget is None else _Faulty(f, budget)

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        budget = covering(path)
        return f if budget is None else _Faulty(f, budget)

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(run_dir, "open", open_, raising=False)

    def fill(folder, free: int, error: int = errno.ENOSPC) -> _DiskBudget:
        budgets.append(_DiskBudget(folder, free, error))
        return budgets[-1]

    return fill


@pytest.fixture
def raw_checkpoint():
    """Returns ``read(run_dir)``: a run's ``checkpoint.pt`` exactly as on disk (no base merged in)."""
    import torch

    def read(run_dir):
        return torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)

    return read


@pytest.fixture
def old_format_checkpoint():
    """Returns ``rewrite(run_dir)``: turns the run's checkpoint into the first format and removes its base.

    The first format (before ``base.safetensors``) had no ``format`` or ``base`` key and held the
    full state dict under ``model``.
    """
    import torch

    from freezetune.training.checkpoint import load_checkpoint
    from freezetune.training.run_dir import RunDir

    def rewrite(run_dir):
        folder = RunDir(run_dir)
        ckpt = load_checkpoint(folder.checkpoint)
        old = {k: v for k, v in ckpt.items() if k not in ("format", "base")}
        torch.save(old, folder.checkpoint)
        folder.base.unlink(missing_ok=True)
        return old

    return rewrite
