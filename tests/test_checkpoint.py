"""Checkpoints: never half-written, never executing code, kept when the loss blows up."""

import json
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import wait_for_file
from freezetune.atomic import remove_stale_temps
from freezetune.cli import app
from freezetune.config import dump_config, load_config
from freezetune.errors import WeightsError
from freezetune.freezing.integrity import tensor_sha256
from freezetune.models.weights import read_weights_file
from freezetune.training import saving as saving_module
from freezetune.training.checkpoint import CHECKPOINT_NAME, FORMAT, load_checkpoint, save_checkpoint
from freezetune.training.recipe import Recipe, run
from freezetune.training.run_dir import BASE_NAME, read_jsonl
from freezetune.training.state import RunState
from freezetune.training.trainable import TRAINABLE_NAME, load_trainable

TINY = {
    "device": "cpu",
    "model.weights": "none",
    "model.num_classes": 4,
    "data.image_size": 32,
    "data.batch_size": 4,
    "data.train_size": 16,
    "data.val_size": 0,
    "train.warmup_steps": 0,
}


def overrides(out: Path, **extra) -> list[str]:
    values = {**TINY, "output.dir": str(out), **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{k}={v}" for k, v in values.items()]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def temps(folder: Path) -> list[Path]:
    return list(Path(folder).glob(".*.tmp"))


# --------------------------------------------------------------------------------------------
# atomic writes


class Linear(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((64, 64), value))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = Linear(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model, opt, RunState(step=1, epoch=0, batch_in_epoch=1))
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")  # a crash after writing part of the new file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, Linear(2.0), opt, RunState(step=2, epoch=0, batch_in_epoch=2))
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 1
    assert temps(tmp_path) == []


class HalfFrozen(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.full((64, 64), 7.0), requires_grad=False)
        self.w = torch.nn.Parameter(torch.full((64, 64), value))


def test_failed_save_keeps_the_previous_checkpoint_and_its_base(tmp_path, monkeypatch):
    model = HalfFrozen(1.0)
    base = {"frozen": tensor_sha256(model.frozen)}
    opt = torch.optim.SGD([model.w], lr=0.1)
    save_checkpoint(tmp_path, model, opt, RunState(step=1), base=base)
    before = {p.name: p.read_bytes() for p in (tmp_path / CHECKPOINT_NAME, tmp_path / BASE_NAME)}

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, HalfFrozen(2.0), opt, RunState(step=2), base=base)
    assert {p.name: p.read_bytes() for p in (tmp_path / CHECKPOINT_NAME, tmp_path / BASE_NAME)} == before
    full = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert full["step"] == 1 and set(full["model"]) == {"frozen", "w"}
    assert torch.equal(full["model"]["frozen"], model.frozen) and torch.equal(full["model"]["w"], model.w)
    assert temps(tmp_path) == []


def test_checkpoint_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        model = Linear(1.0)
        save_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), RunState(step=0))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / CHECKPOINT_NAME).stat().st_mode) == 0o644


def _save_forever(run, first_step: int) -> None:
    """Child process body: save checkpoints back to back until killed."""
    try:
        torch.set_num_threads(1)  # no OpenMP pool in a forked child
        step = first_step
        while True:
            step += 1
            run.state.step = run.state.batch_in_epoch = step
            run.save()
    finally:
        os._exit(1)


def test_sigkill_at_random_moments_while_saving_leaves_loadable_checkpoints(tmp_path):
    # Every parameter trains: checkpoint.pt holds weights + momentum (~90 MB), so each save takes
    # long enough to be hit mid-write. (The trainable-only file is written only when a run ends.)
    run = Recipe(load_config(None, overrides(tmp_path / "run"))).setup()
    run.save()
    rng = random.Random(0)
    hit_mid_write, full_steps = 0, set()
    for round_ in range(1, 7):
        stale = {p.name for p in temps(run.run_dir)}  # left by earlier kills
        pid = os.fork()
        if pid == 0:
            _save_forever(run, 1000 * round_)
        # Kill while the checkpoint is being written: in which of the child's first two saves, and
        # how far into the write, are drawn at random.
        target = f".{CHECKPOINT_NAME}."
        nth, seen = rng.choice([1, 2]), set()
        deadline = time.monotonic() + 30
        while len(seen) < nth:
            seen |= {p.name for p in temps(run.run_dir) if p.name.startswith(target)} - stale
            assert time.monotonic() < deadline, "no save seen"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        hit_mid_write += bool({p.name for p in temps(run.run_dir)} - stale)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        full = load_checkpoint(run.run_dir / CHECKPOINT_NAME)
        trainable = load_trainable(run.run_dir)  # no run ended: read from the checkpoint
        assert set(trainable.tensors) == set(full["model"])
        assert trainable.manifest["step"] == full["step"]
        assert not (run.run_dir / TRAINABLE_NAME).exists()
        full_steps.add(full["step"])
    assert hit_mid_write >= 1  # otherwise the test killed only between saves
    assert len(full_steps) >= 2  # and saves did complete between kills
    remove_stale_temps(run.run_dir)
    assert temps(run.run_dir) == []


def test_sigkilled_cli_run_resumes_without_losing_or_repeating_a_step(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    # Far more steps than any machine trains in the test's lifetime, so the kill always lands
    # on a running process; a save is never long enough to be waited for reliably.
    args = overrides(out, train__epochs=10**7, train__checkpoint_every=1)
    env = {**os.environ, "FREEZETUNE_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "freezetune", "train", "--config", str(tmp_path / "config.yaml"), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    try:
        # Wait for a known checkpoint (one complete save), then kill without warning at a random
        # moment of the saves that follow, one every step: mid-write or between writes.
        wait_for_file(out / CHECKPOINT_NAME, proc)
        time.sleep(random.Random(1).uniform(0, 0.05))
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    assert load_trainable(out).manifest["step"] >= done

    result = cli("train", "--resume", out, f"train.max_steps={done + 2}")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, done + 3))
    assert temps(out) == []


# --------------------------------------------------------------------------------------------
# safe loading


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code an attacker likes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_file(path: Path, marker: Path, fmt: str) -> Path:
    payload = {"model": {"fc.weight": RunsCode(marker)}, "optimizer": {}, "step": 1}
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("fmt", ["pickle", "torch-zip"])
def test_the_crafted_pickle_really_runs_code_when_unpickled_unsafely(tmp_path, fmt):
    # Proves the payload used below is live, so the rejections are meaningful.
    evil = _evil_file(tmp_path / "evil.pth", tmp_path / "pwned", fmt)
    if fmt == "pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch-zip"])
def test_crafted_pickle_as_model_weights_is_rejected_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    evil = _evil_file(tmp_path / "evil.pth", marker, fmt)
    with pytest.raises(WeightsError, match="weights_only=True") as err:
        read_weights_file(evil)
    if fmt == "torch-zip":  # protocol 2: the unpickler reaches the call to open() and refuses it
        assert "would call code" in str(err.value)
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    result = cli("train", "-c", tmp_path / "c.yaml", *overrides(tmp_path / "run", model__weights=evil))
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert "evil.pth" in line and "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch-zip"])
def test_crafted_pickle_as_checkpoint_is_rejected_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(None, overrides(out))))
    _evil_file(out / CHECKPOINT_NAME, marker, fmt)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_checkpoint(out / CHECKPOINT_NAME)
    result = cli("train", "--resume", out)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert CHECKPOINT_NAME in line and "Traceback" not in result.output
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model = Linear(1.0)
    save_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), RunState(step=0))
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="checkpoint.*weights_only=True"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# non-finite loss


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e38: step 1 is finite but its update overflows the logits, so step 2's loss is NaN.
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    args = overrides(out, optim__lr="1.0e+38", train__checkpoint_every=1, freeze__trainable="[fc]")
    result = cli("train", "-c", tmp_path / "c.yaml", *args)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert "at step 2" in line and ("nan" in line or "inf" in line)
    assert "last good checkpoint (step 1)" in line and "Traceback" not in result.output
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["step"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert load_trainable(out / TRAINABLE_NAME).manifest["step"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["steps"] == 1
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_nonfinite_loss_before_any_checkpoint_says_so(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    args = overrides(tmp_path / "run", optim__lr="1.0e+38", freeze__trainable="[fc]")
    result = cli("train", "-c", tmp_path / "c.yaml", *args)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert "at step 2" in line and "no checkpoint had been saved yet" in line
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


# --------------------------------------------------------------------------------------------
# checkpoint.pt holds what can change; the frozen base is written once


def _watch_base(monkeypatch) -> list[tuple[int, int]]:
    """Records base.safetensors' (inode, mtime) after every save of a run: a rewrite changes both."""
    seen = []
    real = saving_module.save_checkpoint

    def save_and_look(run_dir, *args, **kwargs):
        path = real(run_dir, *args, **kwargs)
        st = (Path(run_dir) / BASE_NAME).stat()
        seen.append((st.st_ino, st.st_mtime_ns))
        return path

    monkeypatch.setattr(saving_module, "save_checkpoint", save_and_look)
    return seen


def _bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


UNFREEZE = {"freeze__schedule": "[{epoch: 1, unfreeze: [layer4]}]", "train__epochs": 2}


@pytest.mark.parametrize("extra", [{}, UNFREEZE], ids=["fc-only", "unfreeze-phase"])
def test_a_frozen_runs_checkpoint_leaves_its_base_to_a_file_written_once(tiny, monkeypatch, raw_checkpoint, extra):
    seen = _watch_base(monkeypatch)
    cfg = tiny(freeze__trainable="[fc]", train__checkpoint_every=1, data__val_size=0, **extra)
    summary = run(cfg)
    out = Path(cfg.output.dir)
    assert len(seen) >= 4 and len(set(seen)) == 1  # written by the first save, then left alone

    raw = raw_checkpoint(out)
    assert raw["format"] == FORMAT and raw["base"]["file"] == BASE_NAME
    # The checkpoint's tensors are exactly trainable_state's (the trainable file of the same step).
    assert set(raw["model"]) == set(load_trainable(out).tensors)
    assert not [k for k in raw["model"] if k.startswith(("conv1", "bn1", "layer1", "layer2", "layer3"))]
    from safetensors.torch import load_file

    base = load_file(out / BASE_NAME)
    full = load_checkpoint(out / CHECKPOINT_NAME)["model"]
    assert raw["base"]["tensors"] == len(base) and set(base) == {k for k in full if not k.startswith("fc.")}
    assert all(torch.equal(full[k], t) for k, t in raw["model"].items())
    assert all(torch.equal(full[k], t) for k, t in base.items() if k not in raw["model"])
    if extra:  # layer4 trains from epoch 1: its start is still in the base, overridden by the checkpoint
        assert "layer4.0.conv1.weight" in raw["model"] and "layer4.0.conv1.weight" in base
        assert not torch.equal(base["layer4.0.conv1.weight"], full["layer4.0.conv1.weight"])
    else:
        assert set(raw["model"]) == {"fc.weight", "fc.bias"}
        assert (out / CHECKPOINT_NAME).stat().st_size * 10 < _bytes(full)
        # The base's digest is the trainable checkpoint's and the freeze-integrity check's.
        assert raw["base"]["sha256"] == load_trainable(out).manifest["base_sha256"]
        assert raw["base"]["sha256"] == summary["freeze_integrity"]["sha256"]


def test_the_trainable_file_is_written_when_the_run_ends_and_read_from_the_checkpoint_until_then(tiny):
    cfg = tiny(freeze__trainable="[layer4, fc]", train__epochs=2, data__val_size=0)
    out = Path(cfg.output.dir)
    r = Recipe(cfg).setup()
    try:
        r.start_training()
        r.train_epoch()  # epoch 0 ends with a checkpoint, and nothing for export yet
        assert (out / CHECKPOINT_NAME).is_file() and not (out / TRAINABLE_NAME).exists()
        early = load_trainable(out)  # read from checkpoint.pt
        assert early.path == out / CHECKPOINT_NAME and early.manifest == r.saver.trainable(r.state.step)[1]
        assert all(torch.equal(t, r.model.state_dict()[n]) for n, t in early.tensors.items())
        while r.train_epoch() is not None:
            pass
        result = r.finish()
    finally:
        r.cleanup()
    assert result.status == "completed"
    final = load_trainable(out)
    assert final.path == out / TRAINABLE_NAME
    assert final.manifest["step"] == load_checkpoint(out / CHECKPOINT_NAME)["step"] > early.manifest["step"]
    assert final.manifest["base_sha256"] == early.manifest["base_sha256"]
    assert set(final.tensors) == set(early.tensors)
    # A later checkpoint (a resumed run killed before it ended) wins over the file of the earlier end.
    raw = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    raw["step"] += 1
    torch.save(raw, out / CHECKPOINT_NAME)
    assert load_trainable(out).path == out / CHECKPOINT_NAME


def test_a_checkpoint_without_the_manifest_is_not_read_as_a_trainable_one(tiny):
    cfg = tiny(freeze__trainable="[fc]", data__val_size=0)
    r = Recipe(cfg).setup()
    try:
        r.save()
    finally:
        r.cleanup()
    out = Path(cfg.output.dir)
    raw = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    raw.pop("trainable")  # as an older freezetune wrote it
    torch.save(raw, out / CHECKPOINT_NAME)
    with pytest.raises(WeightsError, match="older freezetune.*--resume"):
        load_trainable(out)


def test_full_fine_tuning_writes_every_tensor_and_no_base(tiny, raw_checkpoint):
    r = Recipe(tiny(data__val_size=0)).setup()
    try:
        r.save()
        raw = raw_checkpoint(r.run_dir)
        assert raw["format"] == FORMAT and raw["base"] is None
        assert set(raw["model"]) == set(r.model.state_dict())
        assert not (r.run_dir / BASE_NAME).exists()
    finally:
        r.cleanup()


@pytest.fixture
def fc_saved(tiny):
    """A run folder with one fc-only checkpoint (base file beside it), and the model it saved."""
    r = Recipe(tiny(freeze__trainable="[fc]", data__val_size=0)).setup()
    try:
        r.save()
        return r.run_dir.path, {k: v.clone() for k, v in r.model.state_dict().items()}, r.config
    finally:
        r.cleanup()


def test_a_checkpoint_given_as_weights_needs_its_base_beside_it(fc_saved, tmp_path):
    import shutil

    from freezetune.config import ModelConfig
    from freezetune.evaluation import load_weights
    from freezetune.models.weights import build_model

    out, state, cfg = fc_saved
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / CHECKPOINT_NAME, alone)
    weights = ModelConfig(num_classes=cfg.model.num_classes, weights=str(alone / CHECKPOINT_NAME))
    for load in (lambda: build_model(weights), lambda: load_weights(out, cfg, alone / CHECKPOINT_NAME)):
        with pytest.raises(WeightsError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and str(alone / BASE_NAME) in message and "not found" in message

    shutil.copy(out / BASE_NAME, alone)
    loaded = build_model(weights).model.state_dict()
    evaluated = load_weights(out, cfg, alone / CHECKPOINT_NAME).model.state_dict()
    for got in (loaded, evaluated):
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_an_old_format_checkpoint_still_evaluates_and_loads_as_weights(fc_saved, old_format_checkpoint):
    from freezetune.evaluation import load_weights

    out, state, cfg = fc_saved
    old = old_format_checkpoint(out)
    assert "format" not in old and set(old["model"]) == set(state) and not (out / BASE_NAME).exists()
    for got in (read_weights_file(out / CHECKPOINT_NAME), load_weights(out, cfg).model.state_dict(),
                load_checkpoint(out / CHECKPOINT_NAME)["model"]):
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_a_checkpoint_of_an_unknown_format_is_one_line(fc_saved, raw_checkpoint):
    out = fc_saved[0]
    raw = raw_checkpoint(out)
    torch.save({**raw, "format": "freezetune-checkpoint/99"}, out / CHECKPOINT_NAME)
    with pytest.raises(WeightsError, match="format 'freezetune-checkpoint/99' is not one this freezetune reads"):
        load_checkpoint(out / CHECKPOINT_NAME)
