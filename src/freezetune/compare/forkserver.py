"""Memory workers forked from one interpreter that has imported torch once, instead of one fresh interpreter each.

A fresh interpreter spends seconds importing torch and torchvision before an arm can start (about
7 s of CPU on a 2-core VM), once per arm. The fork server is one fresh interpreter, started with
the memory worker's environment (:func:`~freezetune.compare.worker.worker_env`), that imports the
worker's modules and then forks one child per arm on request (on Linux; elsewhere each worker is
a fresh interpreter, see :func:`start_workers`). Forking is safe here because the
server never runs a torch operation: no OpenMP thread pool has run (forking after one has can
deadlock) and CUDA is not initialized (it cannot be used in a child forked after that); the
server checks the latter before every fork. Every arm starts from the same state, as a fresh
interpreter would.

A child shares the server's pages, but its page table holds only their anonymous part: the
shared libraries' pages that the import mapped (about 300 MiB for torch) are mapped into the child
again as it touches them. Some of that touching would fall into the arm's memory window and
inflate its peak RSS growth (by 3.4 MiB for every ResNet18 arm at 64 px, batch 8) over what a
fresh interpreter measures, so a child first touches every file-backed page the server had
mapped (:func:`resident_file_pages`); the arms' figures then equal a fresh interpreter's.

Not :mod:`multiprocessing`'s forkserver: its children re-import the caller's ``__main__``, which
fails in scripts without an ``if __name__ == "__main__"`` guard.

The server is the workers' parent, so it also reaps them and reports their exit codes. The
protocol on its connection: ``"fork"`` then a file descriptor (answered with the child's pid),
``("wait", pid, timeout)`` (the exit code, or None while it runs) and ``("kill", pid)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from array import array
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

# How long the server may take to answer anything but a wait (its start-up, a fork).
_ANSWER_TIMEOUT_S = 300.0


def start_workers(env: dict[str, str], fork: bool | None = None) -> ForkServer | FreshWorkers:
    """What starts the memory workers: a :class:`ForkServer` on Linux, else :class:`FreshWorkers`.

    On macOS, system libraries may start threads that a forked child cannot use (Python's
    multiprocessing stopped forking there for that reason), so elsewhere than on Linux every
    worker is a fresh interpreter.

    Args:
        env: The environment of the server, or of each fresh worker.
        fork: Fork the workers; None: on Linux.
    """
    if sys.platform.startswith("linux") if fork is None else fork:
        return ForkServer(env)
    return FreshWorkers(env)


class ForkServer:
    """One server process; :meth:`spawn` gives a worker's pid and the parent's end of its connection."""

    def __init__(self, env: dict[str, str]):
        self._proc, self._conn = _connected(lambda fd: _python(["--forkserver", str(fd)], fd, env))

    def spawn(self) -> tuple[int, Connection]:
        """Forks a worker; returns its pid and this side of the socket it serves.

        Raises:
            RuntimeError: If the server died or refused to fork.
        """
        return _connected(self._fork)

    def _fork(self, fd: int) -> int:
        self._ask("fork")
        send_handle(self._conn, fd, self._proc.pid)
        return self._answer(_ANSWER_TIMEOUT_S)

    def wait(self, pid: int, timeout: float) -> int | None:
        """The worker's exit code once it has exited, None if it still runs after ``timeout`` seconds."""
        self._ask(("wait", pid, timeout))
        return self._answer(timeout + _ANSWER_TIMEOUT_S)

    def kill(self, pid: int) -> int:
        """Kills the worker (SIGKILL) and returns its exit code."""
        self._ask(("kill", pid))
        return self._answer(_ANSWER_TIMEOUT_S)

    def close(self) -> None:
        """Lets the server exit (it reaps the workers left), and stops it if it does not."""
        with contextlib.suppress(OSError):
            self._conn.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _ask(self, message) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise RuntimeError(self._dead()) from None

    def _answer(self, timeout: float):
        try:
            if not self._conn.poll(timeout):
                raise RuntimeError(f"the memory workers' fork server did not answer within {timeout:g} s")
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(self._dead()) from None
        if status != "ok":
            raise RuntimeError(f"the memory workers' fork server failed: {payload}")
        return payload

    def _dead(self) -> str:
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return f"the memory workers' fork server died (exit code {code})"


class FreshWorkers:
    """Starts every worker as a fresh interpreter (``python -m freezetune.compare --worker FD``).

    Where forking is not used; the same interface as :class:`ForkServer`, with no server process.
    """

    def __init__(self, env: dict[str, str]):
        self._env = env
        self._procs: dict[int, subprocess.Popen] = {}

    def spawn(self) -> tuple[int, Connection]:
        """Starts a worker; returns its pid and this side of the socket it serves."""
        proc, conn = _connected(lambda fd: _python(["--worker", str(fd)], fd, self._env))
        self._procs[proc.pid] = proc
        return proc.pid, conn

    def wait(self, pid: int, timeout: float) -> int | None:
        """The worker's exit code once it has exited, None if it still runs after ``timeout`` seconds."""
        try:
            return self._procs[pid].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, pid: int) -> int:
        """Kills the worker (SIGKILL) and returns its exit code."""
        self._procs[pid].kill()
        return self._procs[pid].wait()

    def close(self) -> None:
        """Nothing to stop: each worker was waited for (or killed) by its arm."""


def _connected(hand_over):
    """Makes a socket pair and gives one end's descriptor to ``hand_over(fd)``, closing it here afterwards.

    Returns:
        What ``hand_over`` returned, and the other end as a :class:`Connection`.
    """
    parent, child = socket.socketpair()
    try:
        result = hand_over(child.fileno())
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return result, Connection(parent.detach())


def _python(args: list[str], fd: int, env: dict[str, str]) -> subprocess.Popen:
    """``python -m freezetune.compare ARGS``, inheriting the descriptor ``fd``."""
    return subprocess.Popen([sys.executable, "-m", "freezetune.compare", *args], pass_fds=(fd,),
                            stdin=subprocess.DEVNULL, env=env)


def serve(conn: Connection, child_main) -> None:
    """The server's loop: forks a child running ``child_main(Connection)`` per request, until the parent leaves.

    Ctrl-C reaches the workers (they share the terminal's process group) and each reports it;
    the server ignores it, so that it can still reap them and answer the parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    codes: dict[int, int] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        try:
            if message == "fork":
                answer = _fork(conn, child_main)
            elif message[0] == "wait":
                answer = _wait(message[1], message[2], codes)
            elif message[0] == "kill":
                if message[1] not in codes:  # a reaped child's pid may belong to another process by now
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(message[1], signal.SIGKILL)
                answer = _wait(message[1], None, codes)
            else:
                raise RuntimeError(f"unknown request {message!r}")
            conn.send(("ok", answer))
        except Exception as e:  # answer with the reason rather than leave the parent waiting
            conn.send(("error", f"{type(e).__name__}: {e}"))
    with contextlib.suppress(ChildProcessError):
        while True:
            os.wait()


def _fork(conn: Connection, child_main) -> int:
    fd = recv_handle(conn)
    import torch

    if torch.cuda.is_initialized():  # nothing here uses CUDA; a child could not
        os.close(fd)
        raise RuntimeError("CUDA was initialized in the fork server")
    pages = resident_file_pages()
    pid = os.fork()
    if pid == 0:
        _child(conn, fd, child_main, pages)
    os.close(fd)
    return pid


def resident_file_pages() -> array:
    """The addresses of the pages of files (shared libraries) that this process's page table maps (Linux).

    Read from ``/proc/self/pagemap`` (bit 63 of a page's entry: present), for readable mappings of
    regular files. Empty where that file cannot be read.
    """
    size = os.sysconf("SC_PAGE_SIZE")
    pages = array("Q")
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if not path.startswith("/") or path.startswith("/dev/") or path.endswith("(deleted)") \
                        or "r" not in fields[1]:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                pagemap.seek(start // size * 8)
                entries = memoryview(pagemap.read((end - start) // size * 8)).cast("Q")
                pages.extend(start + i * size for i, entry in enumerate(entries) if entry >> 63)
    except OSError:
        return array("Q")
    return pages


def _child(server_conn: Connection, fd: int, child_main, pages: array) -> None:
    """Runs in the forked worker: serves its own connection, then exits without the server's exit handlers."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server_conn.close()
        for address in pages:  # map what the server had mapped, as a fresh interpreter would have it
            ctypes.string_at(address, 1)
        child_main(Connection(fd))
        code = 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float | None, codes: dict[int, int]) -> int | None:
    """The child's exit code, reaping it; None if it still runs after ``timeout`` seconds (None: wait for ever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while pid not in codes:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            codes[pid] = os.waitstatus_to_exitcode(status)
        elif time.monotonic() >= deadline:
            return None
        else:
            time.sleep(0.01)
    return codes[pid]
