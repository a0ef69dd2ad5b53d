"""End-to-end tests of the command line, through Typer's CliRunner and one real subprocess."""

import json
import subprocess
import sys

import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_overrides
from freezetune import __version__
from freezetune.cli import app
from freezetune.training.checkpoint import load_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"freezetune {__version__}"
    for args in (["--help"], ["train", "--help"], ["validate", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Usage" in result.stdout
    assert "--resume" in invoke("train", "--help").stdout


def test_train_synthetic_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--config", "configs/quickstart.yaml", *tiny_overrides(out))
    assert result.exit_code == 0, result.output
    assert "trainable params: 8,398,858 || all params: 11,181,642 || trainable%: 75.1129" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["freeze_integrity"]["ok"]
    assert summary["params"]["trainable"] == 8_398_858
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"}


def test_train_on_tiny_imagefolder(tmp_path):
    root = tmp_path / "images"
    for split, n in (("train", 6), ("val", 2)):
        for k, colour in enumerate([(250, 20, 20), (20, 20, 250), (20, 250, 20)]):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (48, 40), tuple(c - 3 * i for c in colour)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = tiny_overrides(out, **{"data.source": "imagefolder", "data.root": str(root), "model.num_classes": 3})
    result = invoke("train", "--config", "configs/imagefolder_example.yaml", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["accuracy"] is not None and summary["steps"] == 5  # 18 images / batch 4
    assert summary["freeze_integrity"]["ok"]


def test_frozen_weights_identical_in_checkpoint(tmp_path):
    out = tmp_path / "run"
    init = tmp_path / "init.pth"
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), init)
    args = tiny_overrides(out, **{"model.weights": str(init), "freeze.trainable": "[fc]", "optim.lr": 0.5})
    assert invoke("train", "--config", "configs/quickstart.yaml", *args).exit_code == 0
    start = torch.load(init, weights_only=True)
    trained = load_checkpoint(out / "checkpoint.pt")["model"]  # the base merged back (checkpoint format 2)
    for name, tensor in start.items():
        if name.startswith("fc."):
            assert not torch.equal(tensor, trained[name])
        else:
            assert torch.equal(tensor, trained[name]), name  # BN running stats included


def test_validate_prints_resolved_config_and_counts():
    result = invoke("validate", "--config", "configs/resnet18_linear_probe.yaml", "optim.lr=0.2")
    assert result.exit_code == 0
    assert "lr: 0.2" in result.stdout and "trainable params: 5,130" in result.stdout


def test_config_errors_one_line_each_exit_2(tmp_path):
    result = invoke("validate", "--config", "configs/quickstart.yaml", "optim.lr=0", "data.bacth_size=3")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error:") for line in lines)
    assert any("optim.lr" in line for line in lines) and any("did you mean 'batch_size'" in line for line in lines)
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("validate", "--config", tmp_path / "missing.yaml", "--debug")
    assert result.exit_code != 0 and result.exception is not None
    # CliRunner keeps the exception instead of printing it: what a user sees needs a real process.
    command = [sys.executable, "-m", "freezetune", "validate", "--config", str(tmp_path / "missing.yaml")]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):")
    lines = debug.stderr.strip().splitlines()
    assert lines[-1].startswith("freezetune.errors.ConfigError: ") and "missing.yaml" in lines[-1]  # type, message
    assert "raise ConfigError" in debug.stderr  # down to where it was raised
    assert not any(line.startswith("error:") for line in lines)  # the traceback instead of the one line
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr + plain.stdout
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("error:")
    assert "missing.yaml" in plain.stderr


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "freezetune", "validate", "--config", "configs/quickstart.yaml", "freeze.until=layer9",
         "freeze.trainable=null"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "freeze.until: 'layer9'" in proc.stderr
    assert "Traceback" not in proc.stderr
