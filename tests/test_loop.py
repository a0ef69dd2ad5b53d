"""training/loop.py: what an epoch's time counts (steps and their waits for data) and what it leaves out."""

from __future__ import annotations

import time

import pytest

from freezetune.training import data as data_module
from freezetune.training.events import EpochEnd, StepRecord
from freezetune.training.recipe import Recipe, run
from freezetune.training.reporter import Reporter

LOAD_S = 0.02  # per sample: a slow disk or decoder
IO_S = 0.05  # per step: what the caller does with each step (logging, saving)


class _SlowSamples(data_module.Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        time.sleep(LOAD_S)
        return self.inner[index]


@pytest.fixture
def slow_data(monkeypatch):
    """The synthetic set, each sample taking LOAD_S to load."""
    real = data_module.synthetic_dataset
    monkeypatch.setattr(data_module, "synthetic_dataset", lambda *a, **k: _SlowSamples(real(*a, **k)))


class _Lines(Reporter):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def test_the_wait_for_data_is_training_time_and_the_callers_io_is_not(tiny, slow_data):
    recipe = Recipe(tiny(freeze__trainable="[fc]", data__val_size=0, data__num_workers=0)).setup()
    start, steps, end = time.perf_counter(), [], None
    for event in recipe.loop():
        if isinstance(event, StepRecord):
            steps.append(event)
            time.sleep(IO_S)  # the caller's share: it must not count as training
        else:
            end = event
    wall = time.perf_counter() - start
    assert isinstance(end, EpochEnd) and len(steps) == 4
    batch = steps[0].batch_size
    assert all(s.data_wait_s >= batch * LOAD_S for s in steps)
    assert end.data_wait_seconds == pytest.approx(sum(s.data_wait_s for s in steps))
    assert end.io_seconds >= len(steps) * IO_S
    # The step's own time leaves the wait out: both fit in the epoch's training time, side by side.
    assert end.seconds >= sum(s.data_wait_s + s.step_time_s for s in steps)
    assert end.seconds + end.io_seconds == pytest.approx(wall, abs=0.1)


def test_an_input_bound_run_says_so_once_and_records_it(tiny, slow_data):
    lines = _Lines()
    summary = run(tiny(freeze__trainable="[fc]", data__val_size=0, data__num_workers=0, train__epochs=2), lines)
    said = [line for line in lines.lines if "input-bound" in line]
    assert len(said) == 1  # two epochs, one notice
    feed = summary["data"]
    assert feed["input_bound"] and feed["wait_share"] > 0.2 and feed["num_workers"] == 0
    assert feed["wait_s"] >= 2 * 16 * LOAD_S and feed["samples"] == 32
    assert feed["end_to_end_samples_per_s"] < summary["timing"]["samples_per_s"]
    # On the CPU more workers would take cores from the step: the notice offers the cache instead.
    assert "feature cache" in feed["notice"] and "more data.num_workers" not in feed["notice"]
    # The line printed at the first input-bound epoch gives that epoch's share, the summary the run's.
    assert feed["notice"].split("; ", 1)[1] == said[0].split("; ", 1)[1]
