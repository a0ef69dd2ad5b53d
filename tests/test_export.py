"""Trainable-only checkpoints and ``freezetune export``."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from freezetune.config import ModelConfig, load_config
from freezetune.errors import WeightsError
from freezetune.export import export_run, rebuild_base
from freezetune.models.weights import build_model
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from freezetune.training.recipe import run
from freezetune.training.trainable import MANIFEST_NAME, TRAINABLE_NAME, load_into, load_trainable

TINY = {
    "seed": 5,
    "device": "cpu",
    "model.weights": "none",
    "model.num_classes": 4,
    "data.image_size": 32,
    "data.batch_size": 4,
    "data.train_size": 16,
    "data.val_size": 0,
    "train.warmup_steps": 0,
}


def train_run(out: Path, **extra) -> dict:
    values = {**TINY, "output.dir": str(out), **{k.replace("__", "."): v for k, v in extra.items()}}
    return run(load_config(None, [f"{k}={v}" for k, v in values.items()]))


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def trained_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / CHECKPOINT_NAME)["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def fc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "fc"
    return out, train_run(out, freeze__trainable="[fc]")


def test_fc_only_checkpoint_holds_just_the_head_and_names_its_base(fc_run):
    out, summary = fc_run
    trainable = load_trainable(out)
    assert set(trainable.tensors) == {"fc.weight", "fc.bias"}
    m = trainable.manifest
    assert (m["model"], m["num_classes"], m["step"]) == ("resnet18", 4, summary["steps"])
    assert m["frozen_bn_buffers"] == []
    # The base digest is the one the run's freeze-integrity check computed over frozen tensors.
    assert m["base_sha256"] == summary["freeze_integrity"]["sha256"]

    data = (out / TRAINABLE_NAME).read_bytes()
    readable = json.loads((out / MANIFEST_NAME).read_text())
    assert {k: readable[k] for k in m} == m
    assert readable["file_bytes"] == len(data)
    assert readable["file_sha256"] == hashlib.sha256(data).hexdigest()

    sizes = summary["checkpoint"]
    assert sizes["trainable_bytes"] == len(data)
    assert sizes["full_bytes"] == (out / CHECKPOINT_NAME).stat().st_size
    head_bytes = (512 * 4 + 4) * 4
    assert head_bytes < sizes["trainable_bytes"] < head_bytes + 4096  # tensors + a small header
    # The frozen base is written once beside checkpoint.pt, which holds only what trains (format 2).
    assert sizes["trainable_bytes"] * 100 < sizes["base_bytes"]
    assert sizes["full_bytes"] * 100 < sizes["base_bytes"]


def test_export_cli_writes_weights_that_load_as_the_trained_model(fc_run, tmp_path, cli):
    out, _ = fc_run
    dest = tmp_path / "model.safetensors"
    result = cli("export", out, "--out", dest)
    assert result.exit_code == 0, result.output
    assert "model.weights=" in result.stdout
    cfg = load_config(None, ["model.num_classes=4", f"model.weights={dest}"])
    loaded = build_model(cfg.model)
    assert not loaded.head_replaced
    assert_same_state(loaded.model.state_dict(), trained_state(out))


@pytest.mark.parametrize(
    "trainable, batchnorm",
    [("[fc]", "train"), ("[layer4,fc]", "frozen")],
    ids=["fc+batchnorm-train", "layer4+fc"],
)
def test_buffers_that_change_are_saved_and_merge_back(tmp_path, trainable, batchnorm):
    out = tmp_path / "run"
    train_run(out, freeze__trainable=trainable, freeze__batchnorm=batchnorm)
    saved = load_trainable(out)
    base = rebuild_base(out, saved).model.state_dict()
    names = set(saved.tensors)
    if batchnorm == "train":
        # Frozen-parameter BatchNorm layers update running statistics: those must be saved.
        assert "bn1.running_mean" in saved.manifest["frozen_bn_buffers"]
        assert not torch.equal(saved.tensors["bn1.running_mean"], base["bn1.running_mean"])
        assert "conv1.weight" not in names and "bn1.weight" not in names
    else:
        assert saved.manifest["frozen_bn_buffers"] == []
        assert {"layer4.0.bn1.running_mean", "layer4.1.conv2.weight"} <= names
        assert not any(n.startswith(("layer3.", "bn1.")) for n in names)
    result = export_run(out, tmp_path / "full.safetensors")
    merged = build_model(ModelConfig(num_classes=4, weights=result["out"])).model.state_dict()
    assert_same_state(merged, trained_state(out))


def _random_base(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(build_model(ModelConfig(num_classes=4, weights="none")).model.state_dict(), str(path))
    return path


def test_a_different_base_is_refused(fc_run, tmp_path, cli):
    out, _ = fc_run
    other = _random_base(tmp_path / "other.safetensors", seed=99)
    dest = tmp_path / "model.safetensors"
    result = cli("export", out, "--out", dest, "--base", other)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert "different base" in line and "sha256" in line and "Traceback" not in result.output
    assert not dest.exists()

    torch.manual_seed(99)
    model = build_model(ModelConfig(num_classes=4, weights="none")).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="different base"):
        load_into(model, out)
    assert_same_state(model.state_dict(), before)


def test_the_right_base_file_is_accepted(fc_run, tmp_path, cli):
    out, _ = fc_run
    model = rebuild_base(out, load_trainable(out)).model
    torch.save(model.state_dict(), tmp_path / "base.pth")
    dest = tmp_path / "model.safetensors"
    result = cli("export", out, "--out", dest, "--base", tmp_path / "base.pth")
    assert result.exit_code == 0, result.output
    load_into(model, out)
    assert_same_state(model.state_dict(), trained_state(out))
    assert_same_state(build_model(ModelConfig(num_classes=4, weights=str(dest))).model.state_dict(),
                      trained_state(out))


def _existing(tmp_path, out):
    dest = tmp_path / "taken.safetensors"
    dest.write_bytes(b"keep me")
    return [out, "--out", dest]


def _not_safetensors(tmp_path, out):
    return [out, "--out", tmp_path / "model.pth"]


def _no_folder(tmp_path, out):
    return [out, "--out", tmp_path / "missing" / "model.safetensors"]


def _no_checkpoint(tmp_path, out):
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty", "--out", tmp_path / "model.safetensors"]


def _corrupt_checkpoint(tmp_path, out):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_bytes((out / "config.yaml").read_bytes())
    (bad / TRAINABLE_NAME).write_bytes(b"\x00" * 64)
    return [bad, "--out", tmp_path / "model.safetensors"]


@pytest.mark.parametrize(
    "make_args, expect",
    [
        (_existing, "already exists"),
        (_not_safetensors, ".safetensors"),
        (_no_folder, "does not exist"),
        (_no_checkpoint, "not found"),
        (_corrupt_checkpoint, "not a valid safetensors"),
    ],
    ids=["out-exists", "out-not-safetensors", "out-folder-missing", "no-checkpoint", "corrupt"],
)
def test_export_user_errors(fc_run, tmp_path, make_args, expect, cli):
    out, _ = fc_run
    args = make_args(tmp_path, out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli("export", *args)
    assert result.exit_code == 2
    (line,) = stderr_lines(result)
    assert expect in line and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------------
# ONNX


@pytest.fixture(scope="module")
def onnx():
    """The onnx package, and onnxruntime beside it; a test that needs them is skipped without them.

    Per test, not at the module's top: without the extra, the safetensors tests above still run.
    """
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    """A run whose BatchNorm statistics trained too, so folding has real values to fold."""
    out = tmp_path_factory.mktemp("onnx") / "run"
    train_run(out, **{"freeze.trainable": "[layer4,fc]", "freeze.batchnorm": "train", "train.max_steps": 2})
    return out


def test_onnx_export_matches_the_trained_model_at_any_batch_size(onnx, bn_run, tmp_path, cli):
    import onnxruntime as ort

    dest = tmp_path / "model.onnx"
    result = cli("export", bn_run, "--format", "onnx", "--out", dest)
    assert result.exit_code == 0, result.output
    printed = " ".join(result.stdout.split())
    assert "checked: onnxruntime" in printed and "20 of 20 BatchNorm folded" in printed

    model = build_model(ModelConfig(name="resnet18", num_classes=4, weights="none")).model
    model.load_state_dict(trained_state(bn_run))
    model.eval()
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    [inp], [outp] = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("images", "logits")
    assert inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)  # the batch is dynamic
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (5, 4)
    assert abs(got - expected).max() <= 1e-4 + 1e-4 * abs(expected).max()
    meta = {p.key: p.value for p in onnx.load(str(dest)).metadata_props}
    assert json.loads(meta["freezetune"])["model"] == "resnet18"
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(dest)).graph.node)


def test_an_onnx_file_that_disagrees_with_pytorch_is_an_error_and_nothing_is_written(onnx, bn_run, tmp_path, cli,
                                                                                    monkeypatch):
    import freezetune.export as export

    real = export.run_onnxruntime
    monkeypatch.setattr(export, "run_onnxruntime", lambda m, xs: [y + 0.01 for y in real(m, xs)])
    dest = tmp_path / "model.onnx"
    result = cli("export", bn_run, "--format", "onnx", "--out", dest)
    assert result.exit_code == 2
    [line] = stderr_lines(result)
    assert "onnxruntime's logits differ from PyTorch's" in line and "nothing written" in line
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_its_extra_says_how_to_install_it(bn_run, tmp_path, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = cli("export", bn_run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "pip install 'freezetune[onnx]'" in result.stderr and len(stderr_lines(result)) == 1


def test_fold_for_inference_folds_every_conv_batchnorm_pair_and_keeps_the_output():
    from freezetune.export import fold_for_inference

    model = build_model(ModelConfig(name="resnet18", num_classes=4, weights="none")).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        folded, info = fold_for_inference(model)
        after = folded(x)
    assert info["batchnorm_before"] == info["batchnorm_folded"] == 20
    assert torch.allclose(before, after, atol=1e-5)
