"""A disk that fills up mid-run: exit 2 with one line, the last checkpoint intact, and a clean resume.

Two ways to fill a disk: the ``full_disk`` fixture fails writes after a byte budget (anywhere,
including mid-line in metrics.jsonl), and a real 60/128 MiB tmpfs where the test may mount one.
"""

import subprocess
import sys
import uuid

import pytest

from freezetune.atomic import TEMP_SUFFIX
from freezetune.training import recipe as recipe_module
from freezetune.training import saving as saving_module
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from freezetune.training.run_dir import read_jsonl
from freezetune.training.trainable import TRAINABLE_NAME, load_trainable


def temps(folder):
    return sorted(p.name for p in folder.glob(f".*{TEMP_SUFFIX}"))


def fill_after_first_checkpoint(monkeypatch, budget, free: int):
    """The disk fills right after the first checkpoint is saved, leaving ``free`` bytes."""
    real = saving_module.save_checkpoint

    def save_then_fill(*args, **kwargs):
        real(*args, **kwargs)
        budget.free = free

    monkeypatch.setattr(saving_module, "save_checkpoint", save_then_fill)


def config(folder):
    path = folder / "config.yaml"
    path.write_text("seed: 0\n")
    return path


def steps(run):
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "event" not in r]


@pytest.mark.parametrize(("free", "fails_in"), [(1000, CHECKPOINT_NAME), (150, "metrics.jsonl")])
def test_disk_full_after_a_checkpoint_exits_2_and_resume_neither_loses_nor_repeats_a_step(
        tmp_path, tiny_args, cli, full_disk, monkeypatch, free, fails_in):
    run = tmp_path / "run"
    budget = full_disk(tmp_path, free=1 << 40)
    fill_after_first_checkpoint(monkeypatch, budget, free)
    args = tiny_args(train__epochs=10, train__max_steps=4, train__checkpoint_every=2, data__val_size=0)

    result = cli("train", "--config", config(tmp_path), *args)

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert f"{run / fails_in}: cannot write (no space left on device)" in lines[0]
    assert "the checkpoint of step 2 is intact" in lines[0] and f"--resume {run}" in lines[0]
    assert budget.failures == 1 and temps(run) == []
    assert load_checkpoint(run / CHECKPOINT_NAME)["step"] == 2
    assert load_trainable(run).manifest["step"] == 2

    budget.free = 1 << 40  # space freed
    monkeypatch.undo()
    result = cli("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert steps(run) == [1, 2, 3, 4]
    assert temps(run) == []


def test_disk_full_when_the_final_weights_are_written_keeps_the_checkpoint_and_resume_writes_them(
        tmp_path, tiny_args, cli, full_disk, monkeypatch):
    run = tmp_path / "run"
    budget = full_disk(tmp_path, free=1 << 40)
    fill_after_first_checkpoint(monkeypatch, budget, 1000)  # the only checkpoint is the last step's
    args = tiny_args(train__max_steps=2, data__val_size=0)

    result = cli("train", "--config", config(tmp_path), *args)

    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert f"{run / TRAINABLE_NAME}: cannot write (no space left on device)" in line
    assert "the checkpoint of step 2 is intact" in line and "final weights" in line
    assert temps(run) == [] and not (run / "summary.json").exists()
    assert load_trainable(run).manifest["step"] == 2  # export reads the checkpoint meanwhile

    budget.free = 1 << 40
    monkeypatch.undo()
    result = cli("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert steps(run) == [1, 2] and (run / TRAINABLE_NAME).is_file()
    assert load_trainable(run).path == run / TRAINABLE_NAME


def test_disk_full_before_any_checkpoint_says_there_is_none(tmp_path, tiny_args, cli, full_disk):
    run = tmp_path / "run"
    full_disk(run, free=0)  # the run folder's own files only: the config is written, then nothing
    result = cli("train", "--config", config(tmp_path), *tiny_args(train__max_steps=2, data__val_size=0))
    assert result.exit_code == 2
    assert "cannot write (no space left on device)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert temps(run) == []


def test_disk_full_while_writing_the_summary_keeps_the_checkpoint_and_resume_writes_it(
        tmp_path, tiny_args, cli, full_disk, monkeypatch):
    run = tmp_path / "run"
    budget = full_disk(tmp_path, free=1 << 40)
    real = recipe_module.Recipe.summarize

    def fill_then_summarize(self, outcome):
        budget.free = 10
        return real(self, outcome)

    monkeypatch.setattr(recipe_module.Recipe, "summarize", fill_then_summarize)
    result = cli("train", "--config", config(tmp_path), *tiny_args(train__max_steps=2, data__val_size=0))
    assert result.exit_code == 2
    assert f"{run / 'summary.json'}: cannot write (no space left on device)" in result.stderr
    assert "it writes the missing summary" in result.stderr
    monkeypatch.undo()
    budget.free = 1 << 40
    assert cli("train", "--resume", run).exit_code == 0
    assert (run / "summary.json").is_file() and steps(run) == [1, 2]


# --------------------------------------------------------------------------------------------
# a real small filesystem


@pytest.fixture
def small_fs(tmp_path):
    """Returns ``mount(size_mib)``: a tmpfs of that size (resize it with ``resize``); skipped if none can be mounted."""
    mounted = []

    def run(*args):
        return subprocess.run(args, capture_output=True, text=True)

    def mount(size_mib: int):
        point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        done = run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(point))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    def resize(point, size_mib: int):
        assert run("mount", "-o", f"remount,size={size_mib}m", str(point)).returncode == 0

    mount.resize = resize
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs is Linux only")
    yield mount
    for point in mounted:
        run("umount", "-l", str(point))


def _train(cli, tiny_args, out, *extra):
    args = tiny_args(out_dir=out, train__epochs=10, data__val_size=0)
    return cli("train", "--config", config(out.parent.parent), *args, *extra)


def test_the_issue_60mib_filesystem_refuses_the_first_checkpoint_with_one_line(tmp_path, small_fs, cli, tiny_args):
    # The report: layer3+layer4+fc, checkpoint_every 2, 60 MiB: torch.save died with a traceback.
    fs = small_fs(60)
    out = fs / "run"
    result = _train(cli, tiny_args, out, "freeze.trainable=[layer3,layer4,fc]", "train.checkpoint_every=2",
                    "train.max_steps=4")
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "cannot write (no space left on device)" in line and "no checkpoint had been saved yet" in line
    assert temps(out) == []


def test_a_real_full_disk_at_the_second_checkpoint_then_more_space_then_resume(tmp_path, small_fs, cli, tiny_args):
    # layer4+fc: checkpoint.pt is ~68 MB (weights and momentum) and the frozen base ~11 MB, so
    # 128 MiB takes the first save (both files) but not the second (a new checkpoint beside the old).
    fs = small_fs(128)
    out = fs / "run"
    args = ("freeze.trainable=[layer4,fc]", "train.checkpoint_every=2", "train.max_steps=4")
    result = _train(cli, tiny_args, out, *args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "cannot write (no space left on device)" in line and "the checkpoint of step 2 is intact" in line
    assert temps(out) == []
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2

    small_fs.resize(fs, 256)
    result = cli("train", "--resume", out)
    assert result.exit_code == 0, result.output
    assert steps(out) == [1, 2, 3, 4]
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


# --------------------------------------------------------------------------------------------
# the other commands that write


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, tiny_args, cli, full_disk):
    run = tmp_path / "run"
    assert cli("train", "--config", config(tmp_path), *tiny_args(train__max_steps=1, data__val_size=0)).exit_code == 0
    dest = tmp_path / "out" / "model.safetensors"
    dest.parent.mkdir()
    full_disk(dest.parent, free=1000)
    result = cli("export", run, "--out", dest)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert f"{dest}: cannot write (no space left on device)" in line
    assert list(dest.parent.iterdir()) == []


def test_a_sweep_whose_folder_fills_up_is_one_line(tmp_path, tiny_yaml, cli, full_disk):
    out = tmp_path / "s"
    budget = full_disk(out, free=20_000)  # the sweep's own files fit; a run's first checkpoint does not
    result = cli("sweep", "--config", tiny_yaml(), "--lr-grid", "1", "--only", "full,layer4", "--no-memory",
                 "--no-prune", "--out", out)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "cannot write (no space left on device)" in line and str(out / "runs") in line
    assert f"`freezetune sweep --resume {out}` continues" in line
    budget.free = 1 << 40
    result = cli("sweep", "--resume", out)
    assert result.exit_code == 0, result.output
    assert "recommendation:" in result.stdout
    assert temps(out) == []
