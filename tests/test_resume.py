"""Resume: an interrupted run continues bit for bit like the uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from freezetune.cli import app
from freezetune.config import load_config
from freezetune.training.checkpoint import FORMAT, load_checkpoint
from freezetune.training.recipe import resume_config, run
from freezetune.training.run_dir import BASE_NAME, read_jsonl

# 16 images in batches of 4: 4 steps per epoch, 8 in all. One BatchNorm layer trains besides the
# head, so running statistics and momentum buffers must survive the checkpoint too.
BASE = {
    "seed": 3,
    "device": "cpu",
    "model.weights": "none",
    "model.num_classes": 4,
    "freeze.trainable": "[layer4.1.bn2,fc]",
    "data.image_size": 32,
    "data.batch_size": 4,
    "data.train_size": 16,
    "data.val_size": 8,
    "train.epochs": 2,
    "train.warmup_steps": 0,
}


def overrides(out: Path, **extra) -> list[str]:
    values = {**BASE, "output.dir": str(out), **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{k}={v}" for k, v in values.items()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "straight"
    run(load_config(None, overrides(out)))
    return out


def test_same_config_and_seed_give_identical_losses(uninterrupted, tmp_path):
    run(load_config(None, overrides(tmp_path / "again")))
    assert len(losses(uninterrupted)) == 8
    assert losses(tmp_path / "again") == losses(uninterrupted)
    assert len(set(losses(uninterrupted))) == 8  # real, varying losses, not a constant


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-epoch", "epoch-boundary"])
def test_resume_after_max_steps_is_bit_identical(uninterrupted, tmp_path, stop_at, raw_checkpoint):
    out = tmp_path / "split"
    first = run(load_config(None, overrides(out, train__max_steps=stop_at)))
    assert first["status"] == "completed" and first["steps"] == stop_at
    # What is resumed from: the trainable tensors only, the frozen rest in the base file.
    raw = raw_checkpoint(out)
    assert raw["format"] == FORMAT and raw["base"]["file"] == BASE_NAME and (out / BASE_NAME).is_file()
    assert {"fc.weight", "layer4.1.bn2.weight", "layer4.1.bn2.running_mean"} <= set(raw["model"])
    assert "conv1.weight" not in raw["model"] and "layer4.1.bn1.running_mean" not in raw["model"]
    stale = out / ".checkpoint.pt.killed.tmp"  # as left by a process killed mid-save
    stale.write_bytes(b"half a checkpoint")

    result = cli("train", "--resume", out, "train.max_steps=8")
    assert result.exit_code == 0, result.output

    assert steps(out) == list(range(1, 9))
    assert losses(out) == losses(uninterrupted)  # exact float equality, step by step
    a = load_checkpoint(uninterrupted / "checkpoint.pt")
    b = load_checkpoint(out / "checkpoint.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert not stale.exists()
    # The extension is recorded, so a later --resume continues with it.
    assert load_config(out / "config.yaml").train.max_steps == 8


def test_resume_from_an_old_format_checkpoint_is_bit_identical(uninterrupted, tmp_path, old_format_checkpoint,
                                                              raw_checkpoint):
    out = tmp_path / "old"
    run(load_config(None, overrides(out, train__max_steps=3)))
    old_format_checkpoint(out)  # the full state dict under "model", no base file
    result = cli("train", "--resume", out, "train.max_steps=8")
    assert result.exit_code == 0, result.output
    assert losses(out) == losses(uninterrupted)
    assert raw_checkpoint(out)["format"] == FORMAT and (out / BASE_NAME).is_file()  # saved in the new one


def _tamper(out: Path) -> None:
    """Changes one byte of the base's tensor data, leaving its header (and the digest it declares) intact."""
    data = bytearray((out / BASE_NAME).read_bytes())
    assert len(data) > 8 + int.from_bytes(data[:8], "little") + 1
    data[-1] ^= 0xFF
    (out / BASE_NAME).write_bytes(bytes(data))


def _foreign(out: Path) -> None:
    """Replaces the base with a well-formed one of other weights (another seed's)."""
    from safetensors import safe_open

    from freezetune.config import ModelConfig
    from freezetune.freezing.integrity import tensor_sha256
    from freezetune.models.weights import build_model
    from freezetune.training.checkpoint import write_base

    with safe_open(str(out / BASE_NAME), framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    torch.manual_seed(99)
    other = build_model(ModelConfig(name="resnet18", num_classes=4, weights="none")).model
    (out / BASE_NAME).unlink()
    write_base(out, other, {n: tensor_sha256(other.state_dict()[n]) for n in names})


@pytest.mark.parametrize("damage, expect", [
    (lambda out: (out / BASE_NAME).unlink(), "not found"),
    (_tamper, "not the base checkpoint.pt was saved with"),
    (_foreign, "not the base checkpoint.pt was saved with"),
], ids=["missing", "tampered", "another-runs"])
def test_resume_refuses_a_base_that_is_not_the_checkpoints(tmp_path, damage, expect):
    out = tmp_path / "run"
    run(load_config(None, overrides(out, train__max_steps=2, data__val_size=0)))
    damage(out)
    before = folder_bytes(out)
    result = cli("train", "--resume", out, "train.max_steps=4")
    assert result.exit_code == 2, result.output
    (line,) = stderr_lines(result)
    assert f"{out / BASE_NAME}: {expect}" in line and "Traceback" not in result.output
    assert folder_bytes(out) == before


def test_resume_continues_with_the_saved_loss_scale(tmp_path, monkeypatch):
    # fp16 scaling needs CUDA; a CPU GradScaler exercises the same save/restore path here.
    import freezetune.training.recipe as train_module

    def cpu_scaler(precision, device):
        return torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)

    monkeypatch.setattr(train_module, "grad_scaler", cpu_scaler)
    out = tmp_path / "scaled"
    first = run(load_config(None, overrides(out, train__max_steps=3)))
    saved = load_checkpoint(out / "checkpoint.pt")["scaler"]
    assert first["steps"] == 3 and saved["scale"] == 8.0 * 2**3  # grew once per finite step

    setup = train_module.Recipe(resume_config(out, ["train.max_steps=8"]), resume=True).setup()
    assert setup.engine.scaler.get_scale() == saved["scale"]


def _images(root: Path, n_per_class: int = 4) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "train" / c / f"{i}.png")


@pytest.mark.parametrize("workers", ["auto", 2])
def test_resume_with_random_augmentation_is_bit_identical(tmp_path, workers):
    # Each sample's RandomResizedCrop/flip is drawn from its own (seed, epoch, index) seed, in
    # whichever process loads it: the resumed crops are the uninterrupted run's crops, with loader
    # workers or without (auto gives none to CPU training).
    _images(tmp_path / "img")
    data = {"data__source": "imagefolder", "data__root": str(tmp_path / "img"), "data__augment": "true",
            "model__num_classes": 2, "data__batch_size": 2, "freeze__trainable": "[fc]",
            "train__epochs": 1, "data__val_size": 0, "data__num_workers": workers}
    run(load_config(None, overrides(tmp_path / "straight", **data)))
    run(load_config(None, overrides(tmp_path / "split", train__max_steps=2, **data)))
    run(resume_config(tmp_path / "split", ["train.max_steps=4"]), resume=True)
    assert len(losses(tmp_path / "straight")) == 4
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    if workers != "auto":  # and the crops do not depend on the worker count either
        run(load_config(None, overrides(tmp_path / "none", **{**data, "data__num_workers": 0})))
        assert losses(tmp_path / "none") == losses(tmp_path / "straight")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    run(load_config(None, overrides(out, train__max_steps=2, data__val_size=0)))
    return out


@pytest.mark.parametrize(
    "change, section",
    [
        ("model.num_classes=5", "model"),
        ("model.name=resnet34", "model"),
        ("freeze.trainable=[layer3,layer4,fc]", "freeze"),
        ("freeze.batchnorm=train", "freeze"),
        ("data.batch_size=8", "data"),
        ("optim.lr=0.5", "optim"),
        ("seed=4", "seed"),
        ("adapt.method=bn", "adapt"),
    ],
)
def test_resume_refuses_to_change_what_was_trained(short_run, change, section):
    before = folder_bytes(short_run)
    result = cli("train", "--resume", short_run, "train.max_steps=4", change)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert f"may not change {section}" in line and "Traceback" not in result.output
    assert folder_bytes(short_run) == before


@pytest.mark.parametrize(
    "args, expect",
    [
        (["train.max_steps=2"], "already finished"),
        (["--config", "x.yaml"], "either --config or --resume"),
        (["train.nope=1"], "train.nope"),
    ],
)
def test_resume_user_errors_leave_the_folder_alone(short_run, args, expect):
    before = folder_bytes(short_run)
    result = cli("train", "--resume", short_run, *args)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert expect in line
    assert folder_bytes(short_run) == before


def test_resume_from_a_folder_without_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    result = cli("train", "--resume", tmp_path)
    assert result.exit_code == 2
    assert "checkpoint" in stderr_lines(result)[0]


def test_ctrl_c_stops_after_the_step_and_resume_matches(uninterrupted, tmp_path, monkeypatch):
    """SIGINT arrives in the middle of step 3: the step completes, is checkpointed and logged, the
    summary is written, exit 130 with the resume command; resuming then matches the straight run."""
    import freezetune.training.loop as train_module  # the loop calls train_step

    real_step, calls = train_module.train_step, []

    def step_then_ctrl_c(*args):
        calls.append(1)
        result = real_step(*args)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled by train's StopFlag, not by pytest
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    (tmp_path / "config.yaml").write_text("seed: 3\n")
    result = cli("train", "--config", tmp_path / "config.yaml", *overrides(out))
    assert result.exit_code == 130, result.output
    (line,) = stderr_lines(result)
    assert f"resume with: freezetune train --resume {out}" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 3
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3 and steps(out) == [1, 2, 3]

    monkeypatch.setattr(train_module, "train_step", real_step)
    result = cli("train", "--resume", out)  # exactly the command the hint gives
    assert result.exit_code == 0, result.output
    assert losses(out) == losses(uninterrupted)


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path):
    """A real process: SIGTERM sent to the whole group (as schedulers and `kill -- -PGID` do)
    reaches the DataLoader worker too; the run must still finish its step, save and exit 130."""
    out = tmp_path / "run"
    (tmp_path / "config.yaml").write_text("seed: 3\n")
    args = overrides(out, train__epochs=1000, data__num_workers=1, data__val_size=0)
    env = {**os.environ, "FREEZETUNE_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "freezetune", "train", "--config", str(tmp_path / "config.yaml"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or len(steps(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"freezetune train --resume {out}" in lines[0], stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    done = load_checkpoint(out / "checkpoint.pt")["step"]
    assert done >= 2 and steps(out) == list(range(1, done + 1))
