import io

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from freezetune.cli import app
from freezetune.config import ModelConfig
from freezetune.demo import DemoInputError, autograd_demo, frozen_demo, parse_vector
from freezetune.errors import FreezetuneError
from freezetune.freezing.integrity import tensor_sha256
from freezetune.models.weights import build_model
from freezetune.render.demo import HASH_CHARS, render_autograd, render_frozen
from freezetune.render.format import vec

runner = CliRunner()
STEPS, SEED = 2, 1


@pytest.fixture(scope="module")
def frozen():
    return frozen_demo(steps=STEPS, seed=SEED)


def _lines(renderable) -> list[str]:
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(renderable)
    return console.export_text().splitlines()


# --------------------------------------------------------------------------------------------
# autograd


def test_autograd_classic_numbers():
    d = autograd_demo([2, 3], [6, 4])
    assert d.q == [3 * 2**3 - 6**2, 3 * 3**3 - 4**2] == [-12, 65]
    assert d.grad_fn == "SubBackward0"
    assert d.a_grad == [36, 81] and d.b_grad == [-12, -8]
    assert d.analytic_a_grad == [36, 81] and d.analytic_b_grad == [-12, -8]
    assert d.jacobian_a == [[36, 0], [0, 81]] and d.jacobian_b == [[-12, 0], [0, -8]]
    assert d.jtv_a == d.a_grad and d.jtv_b == d.b_grad
    assert d.jtv_matches and d.max_abs_diff == 0
    assert d.sum_a_grad == d.a_grad and d.sum_b_grad == d.b_grad  # v = ones <=> L = Q.sum()
    assert d.v == [1, 1] and d.v_is_ones
    assert "scalar outputs" in d.vector_backward_error


def test_autograd_graph_is_the_one_autograd_recorded():
    g = autograd_demo([2, 3], [6, 4]).graph
    assert g["node"] == "SubBackward0"
    mul, pow_b = g["next"]
    assert mul["node"] == "MulBackward0" and pow_b["node"] == "PowBackward0"
    assert mul["next"][0]["node"] == "PowBackward0"
    assert mul["next"][0]["next"][0]["node"] == "AccumulateGrad -> a.grad"
    assert pow_b["next"][0]["node"] == "AccumulateGrad -> b.grad"


def test_autograd_other_v_is_a_vector_jacobian_product():
    a, b, v = [1.0, -2.0, 0.5], [3.0, 0.0, -1.5], [2.0, 0.5, -1.0]
    d = autograd_demo(a, b, v)
    assert d.a_grad == pytest.approx([9 * x * x * w for x, w in zip(a, v, strict=True)])
    assert d.b_grad == pytest.approx([-2 * y * w for y, w in zip(b, v, strict=True)])
    assert d.jtv_a == pytest.approx(d.a_grad) and d.jtv_b == pytest.approx(d.b_grad) and d.jtv_matches
    assert d.weighted_sum_a_grad == pytest.approx(d.a_grad)
    assert d.weighted_sum_b_grad == pytest.approx(d.b_grad)
    assert d.sum_a_grad == pytest.approx([9 * x * x for x in a])  # Q.sum() ignores v
    assert not d.v_is_ones
    assert d.jacobian_a[0][1] == 0 and d.jacobian_a[1][1] == pytest.approx(36)


def test_autograd_jtv_uses_the_transpose_for_a_full_jacobian():
    """Q is elementwise so J is diagonal; check J^T v against backward on a non-diagonal J too."""
    x = torch.tensor([3.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, 3.0], dtype=torch.float64)

    def f(t):
        return torch.stack([t[0] * t[1], t[0] + 2 * t[1]])

    f(x).backward(gradient=v)
    jac = torch.autograd.functional.jacobian(f, x.detach())
    assert torch.allclose(jac.T @ v, x.grad) and not torch.allclose(jac @ v, x.grad)


def test_parse_vector_and_bad_input():
    assert parse_vector("2, 3.5,-1", "a") == [2.0, 3.5, -1.0]
    for text in ("", "1,,2", "x", "1,nan", "inf"):
        with pytest.raises(DemoInputError):
            parse_vector(text, "a")
    with pytest.raises(DemoInputError, match=r"a, b need the same .*\(a has 2, b has 1\)"):
        autograd_demo([1.0, 2.0], [1.0])
    with pytest.raises(DemoInputError):
        autograd_demo([1.0], [1.0], [1.0, 1.0])
    assert issubclass(DemoInputError, FreezetuneError)


def test_render_autograd_fits_80_columns():
    for args in (([2, 3], [6, 4], None), ([1.5] * 6, [-2.25] * 6, [0.1] * 6)):
        assert max(len(line) for line in _lines(render_autograd(autograd_demo(*args).to_dict()))) <= 80


def test_cli_autograd_prints_the_classic_numbers():
    result = runner.invoke(app, ["demo", "autograd"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Q.grad_fn = SubBackward0" in out
    assert "Q = [-12, 65]" in out
    assert "J_a = dQ/da = [[36, 0], [0, 81]]" in out and "J_b = dQ/db = [[-12, 0], [0, -8]]" in out
    grads_rows = [line for line in out.splitlines() if "[36, 81]" in line]
    assert len(grads_rows) == 5 and all("[-12, -8]" in line for line in grads_rows)
    assert "J^T v equals the grads from backward: yes (max difference 0)" in out
    assert "scalar outputs" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_cli_autograd_options():
    result = runner.invoke(app, ["demo", "autograd", "--a", "1,2", "--b", "3,4", "--v", "2,1"])
    assert result.exit_code == 0, result.output
    d = autograd_demo([1, 2], [3, 4], [2, 1])
    assert vec(d.a_grad) == "[18, 36]" and vec(d.b_grad) == "[-12, -8]"
    rows = [line for line in result.stdout.splitlines() if "[18, 36]" in line]
    assert len(rows) == 4  # backward(v), by hand, J^T v, (v * Q).sum(); Q.sum() gives [9, 36]
    assert any("Q.sum().backward()" in line and "[9, 36]" in line for line in result.stdout.splitlines())


@pytest.mark.parametrize("args", [["--a", "1,2", "--b", "3"], ["--a", "x"], ["--v", "1"]])
def test_cli_autograd_bad_input_is_one_line_exit_2(args):
    result = runner.invoke(app, ["demo", "autograd", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# frozen


def _rows(arm) -> dict:
    return {t.name: t for t in arm.tensors}


def test_frozen_param_has_no_grad_and_stays_bit_identical(frozen):
    for arm in frozen.arms:
        conv = _rows(arm)["layer1.0.conv1.weight"]
        assert conv.requires_grad is False and conv.grad == "None"
        assert conv.identical and conv.sha256_before == conv.sha256_after and conv.max_abs_change == 0
        bn_weight = _rows(arm)["layer1.0.bn1.weight"]
        assert bn_weight.grad == "None" and bn_weight.identical
        assert arm.fingerprint_identical == arm.fingerprint_tensors > 0


def test_trainable_param_moves(frozen):
    for arm in frozen.arms:
        fc = _rows(arm)["fc.weight"]
        assert fc.requires_grad is True and fc.grad == "set"
        assert not fc.identical and fc.sha256_before != fc.sha256_after and fc.max_abs_change > 0


def test_batchnorm_statistics_drift_only_under_train(frozen):
    by = {arm.batchnorm: arm for arm in frozen.arms}
    assert [arm.batchnorm for arm in frozen.arms] == ["frozen", "train"]
    fr, tr = by["frozen"], by["train"]
    assert fr.bn_mode == "eval" and tr.bn_mode == "train"
    for name in ("layer1.0.bn1.running_mean", "layer1.0.bn1.running_var"):
        assert _rows(fr)[name].identical and _rows(fr)[name].max_abs_change == 0
        assert not _rows(tr)[name].identical and _rows(tr)[name].max_abs_change > 0
    counter = "layer1.0.bn1.num_batches_tracked"
    assert _rows(fr)[counter].max_abs_change == 0 and _rows(tr)[counter].max_abs_change == STEPS
    assert fr.frozen_bn_drifted == 0 and tr.frozen_bn_drifted == tr.frozen_bn_layers == fr.frozen_bn_layers == 15
    # freeze.fingerprint covers frozen BN buffers only when batchnorm is frozen (3 per layer).
    assert fr.fingerprint_tensors == tr.fingerprint_tensors + 3 * 15
    # Same weights and batches, different BatchNorm mode: the forward pass already differs.
    assert fr.losses[0] != tr.losses[0]
    assert len(fr.losses) == len(tr.losses) == STEPS


def test_hashes_are_of_the_real_starting_weights(frozen):
    torch.manual_seed(SEED)
    model = build_model(ModelConfig(name="resnet18", num_classes=10, weights="none")).model
    state = model.state_dict()
    for arm in frozen.arms:
        for row in arm.tensors:
            assert row.sha256_before == tensor_sha256(state[row.name])


def test_frozen_demo_rejects_bad_sizes():
    with pytest.raises(DemoInputError):
        frozen_demo(steps=0)
    with pytest.raises(DemoInputError):
        frozen_demo(batch_size=1)


def test_render_frozen_fits_80_columns(frozen):
    assert max(len(line) for line in _lines(render_frozen(frozen.to_dict()))) <= 80


def test_cli_frozen_prints_the_table(frozen):
    result = runner.invoke(app, ["demo", "frozen", "--steps", str(STEPS), "--seed", str(SEED)],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for arm in frozen.arms:
        assert f"batchnorm: {arm.batchnorm}  (layer1.0.bn1 runs in {arm.bn_mode} mode)" in result.stdout
        assert f"{arm.fingerprint_identical} of {arm.fingerprint_tensors} tensors" in result.stdout
        for row in arm.tensors:
            before, after = row.sha256_before[:HASH_CHARS], row.sha256_after[:HASH_CHARS]
            assert any(row.name in line and before in line and after in line for line in lines)
    conv_lines = [line for line in lines if "layer1.0.conv1.weight" in line]
    assert len(conv_lines) == 2 and all("None" in line and "0 (same)" in line for line in conv_lines)
    mean_lines = [line for line in lines if "running_mean" in line]
    assert "0 (same)" in mean_lines[0] and "0 (same)" not in mean_lines[1]
    counter_lines = [line for line in lines if "num_batches_tracked" in line]
    assert counter_lines[1].split()[-1] == str(STEPS)


def test_cli_frozen_bad_steps_exit_2():
    assert runner.invoke(app, ["demo", "frozen", "--steps", "0"]).exit_code == 2
