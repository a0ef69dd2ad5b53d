"""The run folder: every file name in it, creating it safely, its logs, and reading it back.

:class:`RunDir` is the one owner of a run folder's layout. Everything that reads or writes a run
folder (the recipe, sweep, evaluate, export, plot, compare) goes through it, so a file name is
written down once, here:

- ``config.yaml``: the run's full config (:meth:`RunDir.config` reads it back);
- ``metrics.jsonl``: one row per optimizer step, and nothing else;
- ``events.jsonl``: one row per freeze event (``freeze.auto``), kept apart from the steps;
- ``epochs.jsonl``: one row per epoch end (training time, validation);
- ``summary.json``: the run's record, written when it ends;
- ``frozen_sha256.json``: the frozen tensors' hashes from the start of the run;
- ``checkpoint.pt``: the resume checkpoint (what can change, optimizer, RNG, position), with
  ``base.safetensors``: the frozen base it leaves out, written once;
- ``checkpoint.trainable.{safetensors,json}``: the trainable-only checkpoint (export's input);
- ``.freezetune.lock``: the one-writer lock.

Files in it are written atomically through :mod:`freezetune.atomic`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from freezetune.atomic import write_error, write_json, write_text
from freezetune.config import Config, dump_config, load_config
from freezetune.errors import RunDirError
from freezetune.lock import LOCK_NAME, RunLock, hold

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
EVENTS_NAME = "events.jsonl"
EPOCHS_NAME = "epochs.jsonl"
SUMMARY_NAME = "summary.json"
FINGERPRINT_NAME = "frozen_sha256.json"
CHECKPOINT_NAME = "checkpoint.pt"
BASE_NAME = "base.safetensors"
TRAINABLE_NAME = "checkpoint.trainable.safetensors"
TRAINABLE_MANIFEST_NAME = "checkpoint.trainable.json"


class RunDir:
    """A run folder: its file names, its lock, and a reader and writer for each file.

    Args:
        path: The folder (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: RunLock | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __eq__(self, other) -> bool:
        return isinstance(other, (RunDir, Path, str)) and Path(other) == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ----------------------------------------------------------------------------------------
    # the lock

    def claim(self, overwrite: bool, what: str, resume: bool = False) -> RunDir:
        """Creates the folder and takes its one-writer lock (see :func:`claim_run_dir`); returns self."""
        self._lock = claim_run_dir(self.path, overwrite, what, resume=resume)
        return self

    def release(self) -> None:
        """Lets go of the lock, if this object holds it; another process may then write the folder."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ----------------------------------------------------------------------------------------
    # paths

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one row per step."""
        return self.path / METRICS_NAME

    @property
    def events(self) -> Path:
        """``events.jsonl``: one row per freeze event."""
        return self.path / EVENTS_NAME

    @property
    def epochs(self) -> Path:
        """``epochs.jsonl``: one row per epoch end."""
        return self.path / EPOCHS_NAME

    @property
    def checkpoint(self) -> Path:
        """``checkpoint.pt``: the checkpoint a run resumes from."""
        return self.path / CHECKPOINT_NAME

    @property
    def base(self) -> Path:
        """``base.safetensors``: the frozen tensors ``checkpoint.pt`` leaves out."""
        return self.path / BASE_NAME

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint is there to resume from."""
        return self.checkpoint.is_file()

    # ----------------------------------------------------------------------------------------
    # readers and writers

    def config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """The run's own config (with ``key=value`` overrides): the one reader of ``config.yaml``.

        Raises:
            RunDirError: If the folder holds no config.yaml.
            ConfigError: If the file or an override is not valid.
        """
        if not (self.path / CONFIG_NAME).is_file():
            raise RunDirError(f"{self.path}: no {CONFIG_NAME} (is this a freezetune run folder?)")
        return load_config(self.path / CONFIG_NAME, list(overrides))

    def write_config(self, config: Config) -> None:
        """Writes ``config.yaml`` atomically."""
        write_text(self.path / CONFIG_NAME, dump_config(config))

    def step_rows(self) -> list[dict]:
        """Every step logged in ``metrics.jsonl`` ([] when there is none).

        Folders written before events had a file of their own mixed freeze events into
        ``metrics.jsonl``; those rows are left out here and read by :meth:`event_rows`.
        """
        return [r for r in _rows(self.metrics) if "event" not in r]

    def event_rows(self) -> list[dict]:
        """Every freeze event logged (``events.jsonl``, and old folders' rows in ``metrics.jsonl``)."""
        legacy = [r for r in _rows(self.metrics) if "event" in r]
        return legacy + _rows(self.events)

    def epoch_rows(self) -> list[dict]:
        """Every epoch row, the last word per epoch (a run continued after a checkpoint may repeat one)."""
        last = {}
        for row in _rows(self.epochs):
            last[row["epoch"]] = row
        return [last[k] for k in sorted(last)]

    def summary(self) -> dict | None:
        """``summary.json``, or None while the run has not ended.

        Raises:
            RunDirError: If the file is there but not readable JSON.
        """
        path = self.path / SUMMARY_NAME
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RunDirError(f"{path}: not readable JSON (was the run killed while writing it?)") from None

    def status(self) -> str | None:
        """The ended run's ``status``, or None (no summary yet, or one that cannot be read)."""
        try:
            summary = self.summary()
        except RunDirError:
            return None
        return summary.get("status") if isinstance(summary, dict) else None

    def write_summary(self, summary: dict) -> None:
        """Writes ``summary.json`` atomically."""
        write_json(self.path / SUMMARY_NAME, summary)

    def fingerprints(self) -> dict[str, str] | None:
        """The frozen tensors' hashes from the start of the run, or None if the file is missing."""
        path = self.path / FINGERPRINT_NAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_fingerprints(self, hashes: dict[str, str]) -> None:
        """Writes ``frozen_sha256.json`` atomically."""
        write_json(self.path / FINGERPRINT_NAME, hashes)

    def truncate_logs(self, step: int, keep_event) -> None:
        """Drops what an interrupted process logged after the checkpoint of ``step``: it is redone.

        Args:
            step: The checkpoint's step.
            keep_event: Called with each event row; False drops it (it recurs when training goes on).
        """
        for path in (self.metrics, self.events, self.epochs):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r["step"] <= step and ("event" not in r or keep_event(r))]
                write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def prepare_run_dir(path: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Creates the run folder, refusing to reuse a non-empty one unless allowed.

    Args:
        path: The folder.
        overwrite: Whether an existing non-empty folder may be written into.
        resume: Whether the folder is being continued (it must then exist).

    Raises:
        RunDirError: If the folder holds a previous run, cannot be created, or is not writable.
    """
    path = Path(path)
    _check_reuse(path, overwrite or resume)
    _make_writable(path)
    return path


def claim_run_dir(path: str | Path, overwrite: bool, what: str, resume: bool = False) -> RunLock:
    """Prepares the folder as :func:`prepare_run_dir` does, holding its one-writer lock.

    The lock is taken before the folder is judged empty, so a second writer is told who holds
    the folder (``output.overwrite`` or not), not that it is not empty. Release the returned
    lock when done writing.

    Args:
        path: The folder.
        overwrite: Whether an existing non-empty folder may be written into.
        what: What this process does there, for a refused writer's message (``train``...).
        resume: Whether the folder is being continued.

    Raises:
        FolderLockedError: If another live process writes the folder.
        RunDirError: As :func:`prepare_run_dir`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        _check_reuse(path, True)  # the error for a file in the folder's place
    _make_writable(path)
    lock = hold(path, what, create=False)
    try:
        _check_reuse(path, overwrite or resume)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_reuse(path: Path, allowed: bool) -> None:
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output.dir {path}: exists and is not a folder")
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()) and not allowed:
        raise RunDirError(
            f"output.dir {path}: folder is not empty; choose another output.dir "
            "or set output.overwrite=true"
        )


def _make_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunDirError(f"output.dir {path}: cannot write there ({e.strerror or e})") from None


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a killed run keeps every finished step.

    A failed write (disk full...) raises :class:`~freezetune.errors.WriteError`. The line it
    was writing may be left torn; :func:`read_jsonl` stops before a torn line, and a resumed run
    rewrites the log up to its checkpoint, so no step is lost or logged twice.
    """

    def __init__(self, path: str | Path | None, append: bool = False):
        # path None: a log that keeps nothing (ranks other than 0 in distributed training).
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None:
            try:
                self._f = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                raise write_error(self.path, e) from e

    def write(self, record: dict) -> None:
        """Writes one record and flushes it to the OS.

        Raises:
            WriteError: If the line cannot be written; the log is closed and writes nothing more.
        """
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            self._abandon()
            raise write_error(self.path, e) from e

    def close(self) -> None:
        """Closes the file."""
        if self._f is None:
            return
        try:
            self._f.close()
        except OSError as e:
            self._abandon()
            raise write_error(self.path, e) from e
        self._f = None

    def _abandon(self) -> None:
        """Drops the file without flushing again: a buffer the disk refused must not be retried at close."""
        f, self._f = self._f, None
        with contextlib.suppress(OSError):
            os.close(f.fileno())  # the descriptor goes first, so the object's close cannot write
        with contextlib.suppress(OSError, ValueError):
            f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a JSON-lines file (ignores a torn last line from a killed writer)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
