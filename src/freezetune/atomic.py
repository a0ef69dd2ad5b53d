"""Files that are never half-written: write to a temp sibling, fsync, rename over the target.

A rename is atomic on POSIX filesystems, so a reader (or a run killed mid-write) sees either the
old complete file or the new complete file, never a torn one. Everything freezetune writes to disk
goes through here: run folders, feature-cache metadata, comparison results, exported weights.

The resume checkpoint, written every epoch, is the one exception to the order: it is written
completely and renamed into place at once, so a process killed at any later moment keeps it, and
its fsync (the wait until the bytes are on the disk, about as long as the write itself) runs on a
thread of its own (``sync="background"``) while training goes on; :func:`settle` waits for it.
Only a power cut in that moment could cost the newest checkpoint.

A write that fails (disk full, quota, read-only filesystem, permissions) removes its temp file,
leaves the previous file as it was and raises :class:`~freezetune.errors.WriteError`, which
names the file and the cause in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import errno as errnos
import json
import os
import queue
import re
import shutil
import tempfile
import threading
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


def atomic_write(path: str | Path, write: Callable[[object], None], mode: str = "wb", sync: str = "now") -> None:
    """Writes a file through ``write(fileobj)`` to a temp sibling, fsyncs it, and renames it over.

    The previous file at ``path`` stays intact until the new one is complete.

    Args:
        path: The file.
        write: Writes the content to the file object it is given.
        mode: ``wb`` or ``w``.
        sync: ``now``: fsync before the rename, so the file is on the disk when this returns.
            ``background``: rename once written, and fsync on a background thread (:func:`settle`
            waits for it; a failure there is raised by :func:`settle`).

    Raises:
        WriteError: If the file cannot be written (any OSError, or torch's writer failing on one);
            no temp file is left behind.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    later = None
    try:
        with os.fdopen(fd, mode) as f:
            # mkstemp creates the file 0600; give it the permissions a plain open() would have.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            if sync == "background":
                later = os.dup(f.fileno())
            else:
                os.fsync(f.fileno())
        old = _keep_aside(path, tmp) if later is not None else None
        os.replace(tmp, path)
        if later is None:
            _fsync_dir(path.parent)
        else:
            _SYNCER.submit(later, path, old)
            later = None
    except BaseException as e:
        if later is not None:
            os.close(later)
        # Judged before the temp file goes: its bytes are what filled the disk.
        error = write_error(path, e) if isinstance(e, Exception) else None
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if error is None:
            raise
        raise error from e


def _keep_aside(path: Path, tmp: str) -> Path | None:
    """Links the file about to be replaced under a temp name, so that the syncer frees its blocks.

    Replacing a large file frees its blocks in ``rename``, which waits on the disk (a fifth of a
    second for a 90 MB checkpoint here, nearly none of it CPU time). Kept aside under a temp name,
    the file is deleted on the background thread instead; a process killed first leaves it for
    :func:`remove_stale_temps`. None when there is no such file or no hard links.
    """
    aside = Path(tmp[: -len(TEMP_SUFFIX)] + ".old" + TEMP_SUFFIX)
    try:
        os.link(path, aside)
    except OSError:  # nothing to replace, or a filesystem without hard links: rename waits then
        return None
    return aside


class _Syncer:
    """fsyncs renamed files and their folders, and deletes the files they replaced, on one background thread.

    All of it is waiting on the disk, not CPU time, so it does not slow the training it overlaps.
    Work is done in the order it came. At most two files wait at once (a third :meth:`submit`
    waits), so the newest checkpoint is on the disk at most a save or two behind. A forked child
    starts with no pending work.
    """

    def __init__(self):
        self._pid, self._thread, self._error = None, None, None
        self._queue: queue.Queue = queue.Queue(maxsize=2)

    def submit(self, fd: int, path: Path, replaced: Path | None) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: the parent's thread is not here
            self._pid, self._error, self._queue = os.getpid(), None, queue.Queue(maxsize=2)
            self._thread = threading.Thread(target=self._run, args=(self._queue,), name="freezetune-fsync",
                                            daemon=True)
            self._thread.start()
        self._queue.put((fd, path, replaced))

    def settle(self) -> WriteError | None:
        """Waits until every submitted file is on the disk; returns the first failure since the last call."""
        if self._pid == os.getpid():
            self._queue.join()
        error, self._error = self._error, None
        return error

    def _run(self, work: queue.Queue) -> None:
        while True:
            fd, path, replaced = work.get()
            try:
                os.fsync(fd)
                _fsync_dir(path.parent)
            except OSError as e:
                self._error = self._error or WriteError.of(path, describe(e), e.errno)
            finally:
                os.close(fd)
                if replaced is not None:
                    with contextlib.suppress(OSError):
                        replaced.unlink()
                work.task_done()


_SYNCER = _Syncer()


def settle() -> None:
    """Waits until every file written with ``sync="background"`` is on the disk.

    Raises:
        WriteError: If an fsync failed (the file is in place, but the disk did not take it).
    """
    error = _SYNCER.settle()
    if error is not None:
        raise error


atexit.register(_SYNCER.settle)  # a process that ends normally leaves its checkpoints on the disk


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
