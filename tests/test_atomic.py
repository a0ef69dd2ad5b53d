"""Atomic writes under faults: one WriteError naming the file and the cause, the old file intact, no temp left."""

import errno
import os
import pickle

import pytest
import torch

from freezetune.atomic import TEMP_SUFFIX, atomic_write, write_error, write_json, write_text
from freezetune.errors import FreezetuneError, WriteError


def temps(folder):
    return sorted(p.name for p in folder.glob(f".*{TEMP_SUFFIX}"))


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "no space left on device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
])
def test_a_failed_write_names_file_and_cause_and_keeps_the_old_file(tmp_path, full_disk, code, words):
    path = tmp_path / "summary.json"
    write_json(path, {"old": True})
    full_disk(tmp_path, free=3, error=code)
    with pytest.raises(WriteError) as err:
        write_json(path, {"new": "x" * 100})
    assert str(err.value) == f"{path}: cannot write ({words})"
    assert err.value.errno == code and err.value.path == path
    assert path.read_text().startswith('{\n  "old": true')
    assert temps(tmp_path) == []


def test_torch_save_failing_mid_file_is_a_write_error_and_the_previous_checkpoint_loads(tmp_path, full_disk):
    path = tmp_path / "checkpoint.pt"
    atomic_write(path, lambda f: torch.save({"w": torch.ones(1000)}, f))
    full_disk(tmp_path, free=5000)
    with pytest.raises(WriteError, match="checkpoint.pt: cannot write \\(no space left on device\\)") as err:
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(100_000)}, f))
    # torch wraps the OSError in its own RuntimeError ("unexpected pos ..."); the cause is still found.
    assert isinstance(err.value.__cause__, RuntimeError)
    assert torch.equal(torch.load(path)["w"], torch.ones(1000))
    assert temps(tmp_path) == []


def test_torch_writer_failure_without_an_os_error_blames_a_nearly_full_disk(tmp_path, monkeypatch):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15910400 vs 15910296")
    monkeypatch.setattr("freezetune.atomic._free_bytes", lambda folder: 4096)
    expected = f"{tmp_path / 'c.pt'}: cannot write (no space left on device)"
    assert str(write_error(tmp_path / "c.pt", torch_error)) == expected
    monkeypatch.setattr("freezetune.atomic._free_bytes", lambda folder: 10 << 30)
    assert "torch's writer failed: [enforce fail" in str(write_error(tmp_path / "c.pt", torch_error))


def test_an_error_that_is_no_write_fault_passes_through_unchanged(tmp_path):
    def broken(f):
        raise ValueError("a bug in the caller")

    with pytest.raises(ValueError, match="a bug in the caller"):
        atomic_write(tmp_path / "x", broken)
    assert write_error(tmp_path / "x", RuntimeError("shape mismatch")) is None
    assert temps(tmp_path) == []


def test_a_folder_that_cannot_take_the_temp_file_is_a_write_error(tmp_path):
    with pytest.raises(WriteError, match="no such file or directory"):
        write_text(tmp_path / "missing" / "x.txt", "x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_write_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="permission denied"):
            write_text(tmp_path / "x.txt", "x")
    finally:
        tmp_path.chmod(0o700)


def test_write_error_is_a_user_error_an_os_error_and_survives_a_trip_through_a_worker():
    err = WriteError.of("/runs/a/checkpoint.pt", "no space left on device", errno.ENOSPC).with_hint("free space")
    assert isinstance(err, FreezetuneError) and isinstance(err, OSError)
    assert str(err) == "/runs/a/checkpoint.pt: cannot write (no space left on device); free space"
    # compare's workers send the class name and message; pickling must round-trip too.
    assert str(WriteError(str(err))) == str(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# --------------------------------------------------------------------------------------------
# sync="background": in place at once, on the disk a moment later


def test_a_background_synced_file_is_in_place_at_once_and_synced_in_order(tmp_path, monkeypatch):
    from freezetune import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    for i in range(5):
        atomic_write(tmp_path / "c.pt", lambda f, i=i: f.write(bytes([i]) * 10), sync="background")
        assert (tmp_path / "c.pt").read_bytes() == bytes([i]) * 10  # renamed before its fsync
    atomic.settle()
    files = [p for p in synced if "c.pt" in p]
    assert len(files) == 5 and files[-1] == str(tmp_path / "c.pt")  # the last one is the file in place
    assert temps(tmp_path) == []


def test_a_failed_background_fsync_is_raised_by_settle_once(tmp_path, monkeypatch):
    from freezetune import atomic

    def fail(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomic.os, "fsync", fail)
    atomic_write(tmp_path / "checkpoint.pt", lambda f: f.write(b"x"), sync="background")
    with pytest.raises(WriteError, match="checkpoint.pt: cannot write \\(input/output error\\)"):
        atomic.settle()
    atomic.settle()  # reported once
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"x"


def test_a_forked_child_syncs_on_a_thread_of_its_own(tmp_path):
    from freezetune import atomic

    atomic_write(tmp_path / "parent", lambda f: f.write(b"p"), sync="background")  # the parent's thread runs
    pid = os.fork()
    if pid == 0:
        try:
            atomic_write(tmp_path / "child", lambda f: f.write(b"c"), sync="background")
            atomic.settle()
            os._exit(0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    atomic.settle()
    assert os.waitstatus_to_exitcode(status) == 0 and (tmp_path / "child").read_bytes() == b"c"
