"""The run folder: creating it safely, the per-step metrics log, and reading it back.

Files in it are written atomically through :mod:`freezetune.atomic`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from freezetune.atomic import write_error
from freezetune.errors import RunDirError
from freezetune.lock import LOCK_NAME, RunLock, hold


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
