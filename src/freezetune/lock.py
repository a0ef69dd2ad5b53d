"""One writer per folder: an exclusive lock on ``<folder>/.freezetune.lock`` that dies with its process.

``train`` (and ``--resume``), ``export``, ``compare`` and ``sweep`` each hold the lock of the
folder they write for as long as they write it; a second process is refused at once with
:class:`~freezetune.errors.FolderLockedError`, naming the folder and the holder's PID and
command (which the holder writes into the lock file).

The lock is a POSIX record lock (``fcntl.lockf``), which the kernel drops when its process dies,
SIGKILL included, so a stale lock file never blocks anyone: the next process simply locks it.
Unlike ``flock``, it is not inherited by forked children, so DataLoader workers outliving a
killed run for a few seconds do not keep its folder locked. Its one trap, that closing *any*
descriptor of the file drops the process's lock, is why this module opens each lock file once
per process and shares it: holding a folder again in the same process (a sweep's run inside the
sweep's folder, or the same folder twice) is re-entrant, and the lock goes when the last holder
releases it. Never open a held lock file by other means in the holding process.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from freezetune.atomic import describe
from freezetune.errors import FolderLockedError, RunDirError

LOCK_NAME = ".freezetune.lock"

# Errors that mean the filesystem cannot lock at all (NFS without a lock daemon, some FUSE).
_NO_LOCKS = {errnos.ENOLCK, errnos.EOPNOTSUPP, errnos.ENOSYS, errnos.EINVAL}
# How long a refused process waits for a holder that has locked but not yet said who it is.
_INFO_WAIT_S = 0.5

_guard = threading.RLock()  # re-entrant: a refusal inside hold() reads holder()
_held: dict[str, _Held] = {}  # real path of the folder -> its lock, open once in this process


@dataclass
class _Held:
    """A lock file this process holds, and how many :class:`RunLock` handles share it."""

    folder: Path
    path: Path
    fd: int | None  # None: the filesystem cannot lock; the folder is written unlocked
    pid: int
    count: int = 0

    def valid(self) -> bool:
        """Whether this process still holds the file that the folder's lock path names now."""
        if self.pid != os.getpid():
            return False  # a forked child: the lock belongs to its parent
        if self.fd is None:
            return True
        return _same_file(self.fd, self.path)


class RunLock:
    """A held folder lock: a context manager, or call :meth:`release`. Released on garbage collection too.

    Attributes:
        folder: The folder it locks.
        what: What this holder does there (``train``, ``export``...).
    """

    def __init__(self, held: _Held, key: str, what: str):
        self._held, self._key, self.what = held, key, what
        self.folder = held.folder

    @property
    def locked(self) -> bool:
        """False only where the filesystem cannot lock (the folder is then written unguarded)."""
        return self._held is not None and self._held.fd is not None

    def release(self) -> None:
        """Lets go of the lock (the last holder in this process removes the lock file); idempotent."""
        held, self._held = self._held, None
        if held is None:
            return
        with _guard:
            held.count -= 1
            if held.count > 0:
                return
            if _held.get(self._key) is held:
                del _held[self._key]
            _close(held)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit the module may be half gone
            self.release()


def hold(folder: str | Path, what: str, create: bool = True) -> RunLock:
    """Takes the folder's exclusive lock, or refuses at once if another live process holds it.

    Args:
        folder: The folder to lock.
        what: What this process does there, for the refusal message (``train``, ``export``...).
        create: Create the folder (and its parents) if it does not exist.

    Raises:
        FolderLockedError: If another process holds the lock (the message names its PID).
        RunDirError: If the folder is missing (``create`` False), not a folder, or not writable.
    """
    folder = Path(folder)
    _check_folder(folder, create)
    key = os.path.realpath(folder)
    with _guard:
        held = _held.get(key)
        if held is not None and not held.valid():
            del _held[key]  # the folder was removed or recreated, or this is a forked child
            held = None
        if held is None:
            held = _held[key] = _acquire(folder, what)
        held.count += 1
        return RunLock(held, key, what)


def holder(folder: str | Path) -> dict | None:
    """Who holds (or last held) the folder's lock: ``{"pid", "command", "what", "since", "host"}``.

    None if there is no lock file or it says nothing readable. Safe to call in the holding process.
    """
    folder = Path(folder)
    with _guard:
        held = _held.get(os.path.realpath(folder))
        if held is not None and held.valid() and held.fd is not None:
            return _parse(os.pread(held.fd, 4096, 0))  # never a second descriptor: see the module doc
    try:
        return _parse((folder / LOCK_NAME).read_bytes()[:4096])
    except OSError:
        return None


def _check_folder(folder: Path, create: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder}: exists and is not a folder")
    if folder.is_dir():
        return
    if not create:
        raise RunDirError(f"{folder}: no such folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{folder}: cannot create the folder ({describe(e)})") from None


def _acquire(folder: Path, what: str) -> _Held:
    path = folder / LOCK_NAME
    # A holder that lets go removes the file: whoever locked the old file then tries the new one.
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise RunDirError(f"{folder}: cannot write there ({describe(e)})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_LOCKS:
                return _unlocked(folder, path, e)
            if e.errno in (errnos.EACCES, errnos.EAGAIN):
                raise FolderLockedError(_refusal(folder)) from None
            raise RunDirError(f"{folder}: cannot lock {LOCK_NAME} ({describe(e)})") from None
        if _same_file(fd, path):
            _write_info(fd, what)
            return _Held(folder, path, fd, os.getpid())
        os.close(fd)
    raise FolderLockedError(_refusal(folder))


def _unlocked(folder: Path, path: Path, e: OSError) -> _Held:
    warnings.warn(f"{folder}: the filesystem cannot lock files ({describe(e)}); writing without the "
                  "one-writer-per-folder guard", stacklevel=4)
    return _Held(folder, path, None, os.getpid())


def _write_info(fd: int, what: str) -> None:
    """Says who holds the lock, for the message a refused process prints."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("freezetune", "__main__.py"):
        argv[0] = "freezetune"
    info = {"pid": os.getpid(), "what": what, "command": shlex.join(argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}
    # Best effort: a full disk must not stop the lock itself, which needs no space.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _refusal(folder: Path) -> str:
    info = _wait_for_info(folder)
    if info is None:
        who = "another process (its PID is not recorded)"
    else:
        host = info.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        who = f"pid {info.get('pid')}{where} ({info.get('command') or info.get('what')}, since {info.get('since')})"
    return (f"{folder}: in use by {who}; one process writes a folder at a time "
            "(output.overwrite does not change that): wait for it to finish or stop it")


def _wait_for_info(folder: Path) -> dict | None:
    """The holder's info; it may have locked an instant ago and not yet written it."""
    deadline = time.monotonic() + _INFO_WAIT_S
    while True:
        info = holder(folder)
        if info is not None or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _close(held: _Held) -> None:
    if held.fd is None:
        return
    # Unlink before closing (which drops the lock), and only our own file: a forked child's
    # copy, or a file that already replaced ours, is not ours to remove.
    if held.pid == os.getpid() and _same_file(held.fd, held.path):
        with contextlib.suppress(OSError):
            held.path.unlink()
    with contextlib.suppress(OSError):
        os.close(held.fd)
