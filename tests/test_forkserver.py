"""The memory workers' fork server: one interpreter imports torch, and forks a worker per arm."""

import os
import re
import signal
import time

import pytest

from freezetune import compare
from freezetune.compare.forkserver import ForkServer, FreshWorkers, resident_file_pages, start_workers
from freezetune.compare.worker import MEMORY_WORKER_ENV, ProcessArm, worker_env


@pytest.fixture(scope="module")
def server():
    # One server for the module: each one starts an interpreter that imports torch.
    s = ForkServer(worker_env())
    yield s
    s.close()


def _environ(pid: int) -> dict[bytes, bytes]:
    # A process that has just exec'd reads back an empty environ until the kernel has set it up.
    deadline = time.monotonic() + 30
    while True:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        if env:
            return env
        assert time.monotonic() < deadline, f"pid {pid}: no environment within 30 s"
        time.sleep(0.01)


def _rss_file_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^RssFile:\s+(\d+)", f.read(), re.MULTILINE).group(1))


def test_a_worker_runs_until_killed_and_its_exit_code_comes_back(server):
    pid, conn = server.spawn()
    try:
        assert server.wait(pid, 0.05) is None  # waiting for its first command
        assert server.kill(pid) == -signal.SIGKILL
        assert server.wait(pid, 0) == -signal.SIGKILL  # asked again: the same code
    finally:
        conn.close()


def test_a_worker_starts_with_the_servers_libraries_mapped_and_its_environment(server):
    pid, conn = server.spawn()
    try:
        # A bare fork maps a few MiB of the server's ~300 MiB of library pages; the worker maps
        # them all before it serves, as a fresh interpreter has them after its imports.
        wanted = 0.9 * _rss_file_kib(server._proc.pid)
        deadline = time.monotonic() + 30
        while _rss_file_kib(pid) < wanted:
            assert time.monotonic() < deadline, (_rss_file_kib(pid), wanted)
            time.sleep(0.05)
        env = _environ(pid)
        for key, value in MEMORY_WORKER_ENV.items():
            assert env[key.encode()] == os.environ.get(key, value).encode()
    finally:
        conn.close()
        server.wait(pid, 30)


def test_ctrl_c_leaves_the_server_serving(server):
    pid, conn = server.spawn()  # serving, past its imports
    conn.close()
    assert server.wait(pid, 30) == 0
    os.kill(server._proc.pid, signal.SIGINT)
    pid, conn = server.spawn()
    conn.close()  # the worker sees the parent go and exits cleanly
    assert server.wait(pid, 30) == 0


def test_a_worker_that_dies_is_named_with_its_exit_code(tiny, server):
    arm = ProcessArm(tiny(), compare.ArmSpec("frozen", "fc only", {"until": "layer4"}), server)
    try:
        arm.submit("setup", 3)
        os.kill(arm._pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"arm frozen: worker process died \(exit code -9\)"):
            arm.wait()
    finally:
        arm.close()


def test_a_dead_server_is_one_clear_error():
    server = ForkServer(worker_env())
    server._proc.kill()  # at once: no import paid for
    server._proc.wait()
    with pytest.raises(RuntimeError, match=r"fork server died \(exit code -9\)"):
        server.spawn()
    server.close()


def test_resident_file_pages_are_page_aligned_addresses_of_this_process():
    pages = resident_file_pages()
    size = os.sysconf("SC_PAGE_SIZE")
    assert len(pages) > 100 and all(a % size == 0 for a in pages[:1000])


def test_where_forking_is_not_used_each_worker_is_a_fresh_interpreter_with_the_same_protocol():
    server = start_workers(worker_env(), fork=False)
    assert isinstance(server, FreshWorkers)
    pid, conn = server.spawn()
    try:
        assert all(_environ(pid)[k.encode()] == os.environ.get(k, v).encode() for k, v in MEMORY_WORKER_ENV.items())
        conn.send(("steps", (1, False)))  # anything but init first
        status, payload = conn.recv()
        assert status == "error" and "worker expected init" in payload["traceback"]
        assert server.wait(pid, 30) == 0
    finally:
        conn.close()
    pid, conn = server.spawn()
    assert server.wait(pid, 0.01) is None and server.kill(pid) == -signal.SIGKILL
    conn.close()
    server.close()
