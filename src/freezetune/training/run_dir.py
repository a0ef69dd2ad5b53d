"""The run folder: creating it safely and writing files that are never half-written.

Every file is written to a temporary sibling, flushed and fsynced, then renamed over the target.
A rename is atomic on POSIX filesystems, so a reader (or a run killed mid-write) sees either the
old complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from freezetune.errors import RunDirError

# Suffix of the temp siblings atomic_write renames into place; a killed writer leaves one behind.
TEMP_SUFFIX = ".tmp"


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
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output.dir {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise RunDirError(
            f"output.dir {path}: folder is not empty; choose another output.dir "
            "or set output.overwrite=true"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunDirError(f"output.dir {path}: cannot write there ({e.strerror or e})") from None
    return path


def atomic_write(path: str | Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """Writes a file through ``write(fileobj)`` to a temp sibling, fsyncs it, and renames it over.

    The previous file at ``path`` stays intact until the new one is complete on disk.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Deletes temp files left by :func:`atomic_write` in a process that was killed mid-write.

    Only call this on a folder no other process is writing to (e.g. when resuming a run).

    Returns:
        The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path: str | Path, data: dict) -> None:
    """Atomically writes pretty-printed JSON."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"), mode="w")


def write_text(path: str | Path, text: str) -> None:
    """Atomically writes a text file."""
    atomic_write(path, lambda f: f.write(text), mode="w")


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a killed run keeps every finished step."""

    def __init__(self, path: str | Path | None, append: bool = False):
        # path None: a log that keeps nothing (ranks other than 0 in distributed training).
        self._f = open(path, "a" if append else "w", encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, record: dict) -> None:
        """Writes one record and flushes it to the OS."""
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        """Closes the file."""
        if self._f is not None:
            self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a JSON-lines file (ignores a torn last line from a killed writer)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
