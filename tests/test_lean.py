"""``train.lean_backward``: lean ReLU, convolution and max pooling; the same numbers, bit for bit, less kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from freezetune.config import AdaptConfig, FreezeConfig
from freezetune.freezing.plan import apply_freeze
from freezetune.measure.memory import SavedActivations
from freezetune.models.lean import LeanConv2d, LeanMaxPool2d, MaskedReLU, make_lean, pack_mask, unpack_mask
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from freezetune.training.recipe import run

ARMS = {  # name: what trains
    "full": (FreezeConfig(), AdaptConfig()),
    "bn": (FreezeConfig(), AdaptConfig(method="bn")),
    "bias": (FreezeConfig(), AdaptConfig(method="bias")),
    "until-layer2": (FreezeConfig(until="layer2"), AdaptConfig()),
}


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (2, 16, 4, 4)])
def test_a_mask_packs_eight_to_a_byte_and_unpacks_to_itself(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def _step(model: nn.Module, x: torch.Tensor):
    """One forward and backward: the logits, every gradient by name, and the bytes saved for backward."""
    with SavedActivations(model) as saved:
        out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad, saved.nbytes


def _pair(resnet18, arm: str, channels_last: bool):
    spec, adapt = ARMS[arm]
    apply_freeze(resnet18, spec, "resnet18", adapt)
    lean = copy.deepcopy(resnet18)
    assert make_lean(lean) > 0 and make_lean(lean) == 0  # idempotent
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if channels_last:
        resnet18, lean = (m.to(memory_format=torch.channels_last) for m in (resnet18, lean))
        x = x.to(memory_format=torch.channels_last)
    stock = _step(resnet18, x.clone().requires_grad_())
    return stock, _step(lean, x.clone().requires_grad_())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("arm", list(ARMS))
def test_logits_and_every_gradient_are_bit_identical(resnet18, arm, channels_last):
    (out_a, grads_a, x_a, _), (out_b, grads_b, x_b, _) = _pair(resnet18, arm, channels_last)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
        assert grad.stride() == grads_b[name].stride(), name
    assert torch.equal(x_a, x_b)


def test_behind_frozen_convolutions_far_less_is_kept(resnet18):
    full = _pair(copy.deepcopy(resnet18), "full", False)
    bn = _pair(resnet18, "bn", False)
    # Stock BatchNorm-only keeps nearly what full fine-tuning keeps: the frozen convolutions still
    # save their inputs, and each ReLU its output.
    assert bn[0][3] > 0.9 * full[0][3]
    # Lean, only the trainable BatchNorms' inputs remain in float, the ReLUs' masks and the stem's
    # pooling indices beside them (docs/sliver.md measures it: 0.54x of stock full at 64 px).
    assert bn[1][3] < 0.6 * full[0][3]
    # Under full fine-tuning the convolutions keep the ReLU outputs anyway; the stem's pooling
    # input alone goes.
    assert 0.8 * full[0][3] < full[1][3] < full[0][3]


@pytest.mark.parametrize("value", [float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-45, -1e-45])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_relu_gradient_follows_pytorchs_rule_at_the_edges(value, inplace):
    x = torch.tensor([value, 1.0, -1.0], requires_grad=True)
    grad = torch.tensor([2.0, 3.0, 4.0])
    stock = nn.ReLU(inplace)(x.clone())
    masked = MaskedReLU(inplace)(x.clone())
    assert torch.equal(stock, masked) or (stock.isnan() == masked.isnan()).all()
    (a,) = torch.autograd.grad(stock, x, grad)
    (b,) = torch.autograd.grad(masked, x, grad)
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("kwargs", [
    {"stride": 2, "padding": 1},
    {"padding": 2, "dilation": 2},
    {"groups": 4, "padding": 1},
    {"bias": True, "padding": 1},  # a trainable bias behind a frozen weight: its gradient needs no input
])
def test_a_frozen_weight_convolution_keeps_only_its_weight(kwargs):
    torch.manual_seed(0)
    stock = nn.Conv2d(8, 12, 3, **{"bias": False, **kwargs})
    stock.weight.requires_grad_(False)
    lean = copy.deepcopy(stock)
    make_lean(lean)
    assert type(lean) is LeanConv2d
    x = torch.randn(2, 8, 9, 9)
    a, grads_a, x_a, saved_a = _step(stock, x.clone().requires_grad_())
    b, grads_b, x_b, saved_b = _step(lean, x.clone().requires_grad_())
    assert torch.equal(a, b) and torch.equal(x_a, x_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert saved_a >= x.numel() * 4 and saved_b == 0


def test_max_pooling_keeps_its_indices_not_its_input():
    x = torch.randn(2, 4, 10, 10)
    stock = nn.MaxPool2d(3, 2, 1)
    lean = copy.deepcopy(stock)
    make_lean(lean)
    assert type(lean) is LeanMaxPool2d
    a, _, x_a, saved_a = _step(stock, x.clone().requires_grad_())
    b, _, x_b, saved_b = _step(lean, x.clone().requires_grad_())
    assert torch.equal(a, b) and torch.equal(x_a, x_b)
    indices = a.numel() * 8  # int64
    assert saved_a == x.numel() * 4 + indices and saved_b == indices


def test_without_autograd_the_stock_path_runs_and_nothing_is_saved(resnet18):
    make_lean(resnet18)
    apply_freeze(resnet18, FreezeConfig(), "resnet18", AdaptConfig(method="bn"))
    with torch.no_grad(), SavedActivations(resnet18) as saved:
        out = resnet18(torch.randn(2, 3, 32, 32))
    assert out.grad_fn is None and saved.nbytes == 0


def test_the_state_dict_is_unchanged(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    make_lean(resnet18)
    after = resnet18.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["bn", "lora"])
def test_a_lean_run_trains_to_the_same_weights_as_a_stock_one(tmp_path, tiny_at, method):
    if method == "lora":
        pytest.importorskip("peft")

    def weights(name: str, lean: bool):
        cfg = tiny_at(tmp_path / name, adapt__method=method, train__lean_backward=lean, train__max_steps=3,
                      optim__lr=0.1)
        run(cfg)
        return load_checkpoint(tmp_path / name / CHECKPOINT_NAME)["model"]

    stock, lean = weights("stock", False), weights("lean", True)
    assert stock.keys() == lean.keys()
    for key, tensor in stock.items():
        assert torch.equal(tensor, lean[key]), key


def test_inspect_counts_what_a_lean_step_keeps(tiny):
    from freezetune.inspection import inspect_config

    stock = inspect_config(tiny(adapt__method="bn")).activation_memory
    lean = inspect_config(tiny(adapt__method="bn", train__lean_backward=True)).activation_memory
    assert lean["frozen_bytes"] < 0.6 * stock["frozen_bytes"]
    assert lean["full_bytes"] < stock["full_bytes"]  # the full baseline is lean too
