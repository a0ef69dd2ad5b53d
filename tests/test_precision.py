import pytest
import torch

from freezetune.errors import DeviceError
from freezetune.speed.precision import autocast, check_precision, grad_scaler
from freezetune.training.recipe import run
from freezetune.training.run_dir import read_jsonl


def test_fp16_refused_on_cpu_with_reason():
    with pytest.raises(DeviceError, match="fp16 needs CUDA"):
        check_precision("fp16", torch.device("cpu"))
    assert grad_scaler("fp16", torch.device("cpu")) is None


def test_bf16_autocast_on_cpu_runs_matmuls_in_bf16():
    check_precision("bf16", torch.device("cpu"))
    with autocast("bf16", torch.device("cpu")):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_bf16_and_channels_last_training_track_fp32(tiny, tmp_path):
    common = dict(freeze__trainable="[layer4,fc]", train__epochs=2, data__val_size=8, optim__lr=0.001)
    ref = run(tiny(**common, output__dir=str(tmp_path / "fp32")))
    bf16 = run(tiny(**common, train__precision="bf16", output__dir=str(tmp_path / "bf16")))
    cl = run(tiny(**common, train__channels_last="true", output__dir=str(tmp_path / "cl")))
    losses = {name: [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
              for name in ("fp32", "bf16", "cl")}
    # Same weights, same batch: the first loss agrees tightly; later steps drift apart only as far
    # as float rounding in different kernels (layout) or bf16 matmuls can push a short SGD run.
    assert losses["cl"][0] == pytest.approx(losses["fp32"][0], rel=1e-5)
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2)
    torch.testing.assert_close(losses["cl"], losses["fp32"], rtol=0.05, atol=0.05)
    # bf16 rounding changes the trajectory step by step; the run as a whole must still track fp32.
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    assert mean["bf16"] == pytest.approx(mean["fp32"], rel=0.1)
    assert bf16["speed"]["precision"] == "bf16" and cl["speed"]["channels_last"]
    assert all(s["freeze_integrity"]["ok"] for s in (ref, bf16, cl))


def test_fp16_on_cpu_is_a_clean_cli_error(cli, tiny_args):
    result = cli("train", "--config", "configs/quickstart.yaml", *tiny_args(train__precision="fp16"))
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    assert result.exit_code == 2 and "fp16 needs CUDA" in result.stderr and "Traceback" not in result.output
