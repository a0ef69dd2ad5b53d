"""Files that are never half-written: write to a temp sibling, fsync, rename over the target.

A rename is atomic on POSIX filesystems, so a reader (or a run killed mid-write) sees either the
old complete file or the new complete file, never a torn one. Everything freezetune writes to disk
goes through here: run folders, feature-cache metadata, comparison results, exported weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Suffix of the temp siblings atomic_write renames into place; a killed writer leaves one behind.
TEMP_SUFFIX = ".tmp"


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
