"""One writer per folder: a second process is refused with its PID; a SIGKILLed holder's lock goes with it."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import wait_for_file
from freezetune.errors import FolderLockedError, RunDirError
from freezetune.lock import LOCK_NAME, hold, holder
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from freezetune.training.run_dir import read_jsonl

HOLD = ("import sys, time; from freezetune.lock import hold; l = hold(sys.argv[1], 'test'); "
        "print('held', flush=True); time.sleep(300)")


@pytest.fixture
def other_process():
    """Returns ``start(folder)``: another process holding the folder's lock until the test ends (or kills it)."""
    procs = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_held_folder_refuses_another_process_naming_its_pid_until_it_is_killed(tmp_path, other_process):
    proc = other_process(tmp_path / "run")
    with pytest.raises(FolderLockedError) as err:
        hold(tmp_path / "run", "train")
    assert f"{tmp_path / 'run'}: in use by pid {proc.pid}" in str(err.value)
    assert "output.overwrite does not change that" in str(err.value)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()  # stale, and no obstacle
    with hold(tmp_path / "run", "train") as lock:
        assert lock.locked and holder(tmp_path / "run")["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # let go: the file goes


def test_the_same_process_may_hold_a_folder_twice_and_keeps_it_until_the_last_release(tmp_path):
    first = hold(tmp_path, "sweep")
    second = hold(tmp_path, "train")
    first.release()
    assert (tmp_path / LOCK_NAME).exists()
    second.release()
    second.release()  # idempotent
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_file_in_place_of_the_folder_or_a_missing_folder_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a folder"):
        hold(tmp_path / "f", "train")
    with pytest.raises(RunDirError, match="no such folder"):
        hold(tmp_path / "missing", "export", create=False)


def _config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("seed: 0\n")
    return path


ENV = {**os.environ, "FREEZETUNE_OFFLINE": "1"}


def _command(tmp_path, args):
    return [sys.executable, "-m", "freezetune", "train", "--config", str(_config(tmp_path)), *args]


def _train(tmp_path, args, **kwargs):
    return subprocess.Popen(_command(tmp_path, args), text=True, env=ENV, **kwargs)


def test_a_second_train_into_a_live_run_is_refused_even_with_overwrite_and_a_killed_run_resumes(
        tmp_path, tiny_args, cli):
    out = tmp_path / "run"
    args = tiny_args(out, train__epochs=10**7, train__checkpoint_every=2, data__val_size=0, output__overwrite="true")
    first = _train(tmp_path, args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_file(out / CHECKPOINT_NAME, first)
        # The second train runs in this process: another process than the first all the same, and
        # without a second interpreter importing torch while the first trains.
        second = cli("train", "--config", _config(tmp_path), *args)
        assert first.poll() is None  # the live run was not disturbed
    finally:
        first.kill()
        first.communicate()
    assert second.exit_code == 2, second.output
    [line] = second.stderr.strip().splitlines()
    assert f"{out}: in use by pid {first.pid}" in line and "freezetune train" in line
    assert "Traceback" not in second.stderr

    assert first.returncode == -signal.SIGKILL
    done = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    result = cli("train", "--resume", out, f"train.max_steps={done + 2}")  # the dead holder's lock is no obstacle
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, done + 3))
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["resume", "export", "compare", "sweep"])
def test_every_writing_command_is_refused_on_a_folder_in_use(tmp_path, tiny_args, tiny_yaml, cli, other_process,
                                                             command):
    run = tmp_path / "run"
    assert cli("train", "--config", tiny_yaml(train__max_steps=1, data__val_size=0)).exit_code == 0
    target = {"resume": run, "export": tmp_path / "dest", "compare": tmp_path / "cmp", "sweep": tmp_path / "s"}[command]
    proc = other_process(target)
    args = {
        "resume": ["train", "--resume", run, "train.max_steps=2"],
        "export": ["export", run, "--out", target / "model.safetensors"],
        "compare": ["compare", "frozen-vs-full", "--config", tiny_yaml(), "--steps", 1, "--out", target, "--no-memory",
                    "freeze.until=layer3"],
        "sweep": ["sweep", "--config", tiny_yaml(), "--lr-grid", "1", "--only", "full,layer4", "--no-memory",
                  "--out", target],
    }[command]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert f"{target}: in use by pid {proc.pid}" in line
