"""Files that are never half-written: write to a temp sibling, fsync, rename over the target.

A rename is atomic on POSIX filesystems, so a reader (or a run killed mid-write) sees either the
old complete file or the new complete file, never a torn one. Everything freezetune writes to disk
goes through here: run folders, feature-cache metadata, comparison results, exported weights.

A write that fails (disk full, quota, read-only filesystem, permissions) removes its temp file,
leaves the previous file as it was and raises :class:`~freezetune.errors.WriteError`, which
names the file and the cause in one line.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from freezetune.errors import WriteError, first_line

# Suffix of the temp siblings atomic_write renames into place; a killed writer leaves one behind.
TEMP_SUFFIX = ".tmp"

# What torch's zip writer raises when a write callback failed or wrote short: the OSError is then
# only (sometimes) in the exception's context.
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|PytorchStreamWriter failed|iostream error|file write failed")
# Free bytes under which a failed torch write is put down to a full disk.
_FULL_DISK_BYTES = 1 << 20


def atomic_write(path: str | Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """Writes a file through ``write(fileobj)`` to a temp sibling, fsyncs it, and renames it over.

    The previous file at ``path`` stays intact until the new one is complete on disk.

    Raises:
        WriteError: If the file cannot be written (any OSError, or torch's writer failing on one);
            no temp file is left behind.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, mode) as f:
            # mkstemp creates the file 0600; give it the permissions a plain open() would have.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        # Judged before the temp file goes: its bytes are what filled the disk.
        error = write_error(path, e) if isinstance(e, Exception) else None
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if error is None:
            raise
        raise error from e


def write_error(path: str | Path, e: BaseException) -> WriteError | None:
    """The :class:`WriteError` a failure while writing ``path`` amounts to; None if it is no write fault.

    An OSError names the cause. torch's writer turns its callback's OSError into a RuntimeError
    (the OSError is then in its context) or fails having lost it ("unexpected pos 15910400 vs
    15910296"): then a nearly full disk is the cause when there is one, otherwise the message's
    first line.
    """
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError):
        return WriteError.of(path, describe(e), e.errno)
    if isinstance(e, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(e)):
        os_error = _os_error_in(e)
        if os_error is not None:
            return WriteError.of(path, describe(os_error), os_error.errno)
        if _free_bytes(Path(path).parent) < _FULL_DISK_BYTES:
            return WriteError.of(path, os.strerror(errnos.ENOSPC).lower(), errnos.ENOSPC)
        return WriteError.of(path, f"torch's writer failed: {first_line(e)}")
    return None


def describe(e: OSError) -> str:
    """An OSError's cause in words, e.g. "no space left on device" or "read-only file system"."""
    if e.errno:
        return os.strerror(e.errno).lower()
    return (e.strerror or str(e) or type(e).__name__).lower()


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Deletes temp files left by :func:`atomic_write` in a process that was killed mid-write.

    Only call this on a folder no other process is writing to (while holding its
    :mod:`freezetune.lock`, e.g. when resuming a run).

    Returns:
        The files removed.

    Raises:
        WriteError: If one cannot be removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            try:
                tmp.unlink(missing_ok=True)
            except OSError as e:
                raise WriteError.of(tmp, f"cannot remove this stale temp file: {describe(e)}", e.errno) from e
            removed.append(tmp)
    return removed


def write_json(path: str | Path, data: dict) -> None:
    """Atomically writes pretty-printed JSON."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"), mode="w")


def write_text(path: str | Path, text: str) -> None:
    """Atomically writes a text file."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def _os_error_in(e: BaseException) -> OSError | None:
    """The first OSError in ``e``'s chain of causes and contexts (torch wraps its callback's)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return _FULL_DISK_BYTES  # unknown: do not claim the disk is full


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
