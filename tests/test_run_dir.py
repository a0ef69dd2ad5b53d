"""training/run_dir.py: the run folder's names, its lock, and its readers and writers."""

from __future__ import annotations

import json
import os

import pytest

from freezetune import lock as lock_mod
from freezetune.errors import RunDirError
from freezetune.lock import holder
from freezetune.training.run_dir import (
    CONFIG_NAME,
    EPOCHS_NAME,
    EVENTS_NAME,
    METRICS_NAME,
    MetricsLog,
    RunDir,
    read_jsonl,
)


def _lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_config_round_trips_and_takes_overrides(tmp_path, tiny):
    folder = RunDir(tmp_path / "run")
    folder.path.mkdir()
    cfg = tiny(train__max_steps=3)
    folder.write_config(cfg)
    assert (folder / CONFIG_NAME).is_file()
    assert folder.config() == cfg
    assert folder.config(["train.max_steps=7"]).train.max_steps == 7


def test_a_folder_without_config_is_one_clear_error(tmp_path):
    with pytest.raises(RunDirError, match=r"no config\.yaml \(is this a freezetune run folder\?\)"):
        RunDir(tmp_path).config()


def test_steps_and_events_are_read_apart_and_old_mixed_logs_still_read(tmp_path):
    folder = RunDir(tmp_path)
    step = {"step": 1, "loss": 2.0}
    old_event = {"event": "auto_freeze", "step": 1, "stage": "stem"}
    _lines(tmp_path / METRICS_NAME, [step, old_event])  # a folder from before events.jsonl
    _lines(tmp_path / EVENTS_NAME, [{"event": "auto_freeze", "step": 2, "stage": "layer1"}])
    assert folder.step_rows() == [step]
    assert [r["stage"] for r in folder.event_rows()] == ["stem", "layer1"]


def test_missing_logs_read_as_empty(tmp_path):
    folder = RunDir(tmp_path)
    assert folder.step_rows() == [] and folder.event_rows() == [] and folder.epoch_rows() == []
    assert folder.summary() is None and folder.status() is None and folder.fingerprints() is None


def test_epoch_rows_keep_the_last_word_per_epoch(tmp_path):
    _lines(tmp_path / EPOCHS_NAME, [{"epoch": 0, "step": 2, "v": "a"}, {"epoch": 1, "step": 4, "v": "b"},
                                    {"epoch": 0, "step": 2, "v": "c"}])
    assert [(r["epoch"], r["v"]) for r in RunDir(tmp_path).epoch_rows()] == [(0, "c"), (1, "b")]


def test_a_torn_summary_is_one_line_and_status_is_none(tmp_path):
    (tmp_path / "summary.json").write_text('{"status": "compl')
    folder = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="not readable JSON"):
        folder.summary()
    assert folder.status() is None
    folder.write_summary({"status": "completed"})
    assert folder.status() == "completed"


def test_truncate_logs_drops_what_came_after_the_checkpoint(tmp_path):
    folder = RunDir(tmp_path)
    _lines(folder.metrics, [{"step": s} for s in (1, 2, 3)])
    _lines(folder.events, [{"event": "auto_freeze", "step": 2, "stage": "stem"},
                           {"event": "auto_freeze", "step": 2, "stage": "layer1"},
                           {"event": "auto_freeze", "step": 3, "stage": "layer2"}])
    _lines(folder.epochs, [{"epoch": 0, "step": 2}, {"epoch": 1, "step": 3}])
    folder.truncate_logs(2, keep_event=lambda r: r["stage"] == "stem")
    assert [r["step"] for r in read_jsonl(folder.metrics)] == [1, 2]
    assert [r["stage"] for r in read_jsonl(folder.events)] == ["stem"]
    assert [r["epoch"] for r in read_jsonl(folder.epochs)] == [0]


def test_claim_holds_the_lock_until_released(tmp_path):
    out = tmp_path / "run"
    folder = RunDir(out).claim(overwrite=False, what="train")
    assert holder(out)["what"] == "train" and holder(out)["pid"] == os.getpid()
    assert os.path.realpath(out) in lock_mod._held  # held by this process (re-entrant within it)
    folder.release()
    folder.release()  # twice is harmless
    assert os.path.realpath(out) not in lock_mod._held
    RunDir(out).claim(overwrite=True, what="export").release()


def test_claim_refuses_a_folder_with_a_previous_run(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(RunDirError, match="folder is not empty"):
        RunDir(tmp_path).claim(overwrite=False, what="train")


def test_a_run_dir_reads_as_its_path(tmp_path):
    folder = RunDir(tmp_path)
    assert str(folder) == str(tmp_path) and folder / "x" == tmp_path / "x" and folder == tmp_path


def test_read_jsonl_stops_at_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_metrics_log_appends_and_a_log_without_a_path_keeps_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1})
    log.close()
    again = MetricsLog(path, append=True)
    again.write({"step": 2})
    again.close()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    nothing = MetricsLog(None)
    nothing.write({"step": 3})
    nothing.close()
