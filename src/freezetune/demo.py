"""Worked examples behind ``freezetune demo``: what autograd computes, and what freezing does.

Both demos return plain data; the CLI only prints it, and the tests check every printed number.

* :func:`autograd_demo` is the classic ``Q = 3a^3 - b^2`` example: ``Q.backward(gradient=v)``
  computes the vector-Jacobian product ``J^T v``, checked against ``J`` built explicitly.
* :func:`frozen_demo` trains a randomly initialised ResNet18 for a few steps through the recipe
  (the same loop as ``freezetune train``) and shows that a frozen layer gets no ``.grad`` and
  stays bit-identical, while BatchNorm running statistics still drift unless the freeze plan
  keeps BatchNorm in eval mode.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from freezetune.config import Config, DataConfig, FreezeConfig, ModelConfig, OutputConfig, TrainConfig
from freezetune.errors import DemoInputError
from freezetune.freezing.integrity import tensor_sha256
from freezetune.training.recipe import Recipe, StepRecord

# The frozen-layer demo: train layer4 and fc, freeze everything up to layer3.
FROZEN_DEMO_TRAINABLE = ["layer4", "fc"]
# Tensors shown in its table: a frozen conv, the frozen BatchNorm after it, a trainable weight.
FROZEN_DEMO_TENSORS = (
    ("layer1.0.conv1.weight", "frozen param"),
    ("layer1.0.bn1.weight", "frozen BN param"),
    ("layer1.0.bn1.running_mean", "BN statistic"),
    ("layer1.0.bn1.running_var", "BN statistic"),
    ("layer1.0.bn1.num_batches_tracked", "BN counter"),
    ("fc.weight", "trainable param"),
)


# --------------------------------------------------------------------------------------------
# autograd


@dataclass
class AutogradDemo:
    """Everything ``freezetune demo autograd`` prints.

    Attributes:
        a, b, v: The inputs and the external gradient.
        q: ``Q = 3a^3 - b^2``.
        grad_fn: Class name of ``Q.grad_fn`` (``SubBackward0``).
        graph: The backward graph from ``Q.grad_fn`` as nested ``{"node", "next"}`` dicts.
        vector_backward_error: What ``Q.backward()`` without a gradient says (Q is not a scalar).
        a_grad, b_grad: ``a.grad`` and ``b.grad`` after ``Q.backward(gradient=v)``.
        analytic_a_grad, analytic_b_grad: ``9a^2 * v`` and ``-2b * v`` by hand.
        jacobian_a, jacobian_b: ``dQ/da`` and ``dQ/db`` from ``torch.autograd.functional.jacobian``.
        jtv_a, jtv_b: ``J_a^T v`` and ``J_b^T v`` from those explicit Jacobians.
        jtv_matches: Whether ``J^T v`` equals the grads from backward (to float64 rounding).
        max_abs_diff: Largest difference between the two.
        weighted_sum_a_grad, weighted_sum_b_grad: Grads of the scalar ``L = (v * Q).sum()``,
            whose ``dL/dQ`` is ``v``: the same as ``Q.backward(gradient=v)``.
        sum_a_grad, sum_b_grad: Grads of ``L = Q.sum()``, i.e. ``v`` = all ones.
        v_is_ones: Whether ``v`` is all ones (then the ``Q.sum()`` grads equal ``a_grad``...).
    """

    a: list[float]
    b: list[float]
    v: list[float]
    q: list[float]
    grad_fn: str
    graph: dict
    vector_backward_error: str
    a_grad: list[float]
    b_grad: list[float]
    analytic_a_grad: list[float]
    analytic_b_grad: list[float]
    jacobian_a: list[list[float]]
    jacobian_b: list[list[float]]
    jtv_a: list[float]
    jtv_b: list[float]
    jtv_matches: bool
    max_abs_diff: float
    weighted_sum_a_grad: list[float]
    weighted_sum_b_grad: list[float]
    sum_a_grad: list[float]
    sum_b_grad: list[float]
    v_is_ones: bool

    def to_dict(self) -> dict:
        """Returns plain JSON-able data."""
        return asdict(self)


def parse_vector(text: str, name: str) -> list[float]:
    """Parses ``"2,3"`` into ``[2.0, 3.0]``.

    Raises:
        DemoInputError: If an entry is not a finite number or the list is empty.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DemoInputError(f"--{name} {text!r}: expected comma-separated numbers, e.g. 2,3") from None
    if not all(math.isfinite(x) for x in values):
        raise DemoInputError(f"--{name} {text!r}: numbers must be finite")
    return values


def autograd_demo(a: list[float], b: list[float], v: list[float] | None = None) -> AutogradDemo:
    """Runs the ``Q = 3a^3 - b^2`` example in float64.

    Args:
        a: Values of ``a``.
        b: Values of ``b``, as many as ``a``.
        v: The external gradient passed to ``Q.backward``; all ones when None.

    Returns:
        The AutogradDemo with every number it shows.

    Raises:
        DemoInputError: If the vectors are empty or their lengths differ.
    """
    given = {"a": a, "b": b} if v is None else {"a": a, "b": b, "v": v}
    if not a or len({len(x) for x in given.values()}) > 1:
        sizes = ", ".join(f"{k} has {len(x)}" for k, x in given.items())
        raise DemoInputError(f"{', '.join(given)} need the same non-zero number of values ({sizes})")
    a, b = [float(x) for x in a], [float(x) for x in b]
    v = [1.0] * len(a) if v is None else [float(x) for x in v]
    ta, tb = _leaf(a), _leaf(b)
    tv = torch.tensor(v, dtype=torch.float64)
    q = _q(ta, tb)
    graph = _graph(q.grad_fn, {id(ta): "a", id(tb): "b"})
    try:
        q.backward()  # Q is a vector: autograd needs to be told dL/dQ
    except RuntimeError as e:
        error = str(e).strip().splitlines()[0]
    else:
        raise AssertionError("backward of a non-scalar without a gradient should fail")
    q.backward(gradient=tv)
    ja, jb = torch.autograd.functional.jacobian(_q, (ta.detach(), tb.detach()))
    jtv_a, jtv_b = ja.T @ tv, jb.T @ tv
    diff = max((jtv_a - ta.grad).abs().max().item(), (jtv_b - tb.grad).abs().max().item())
    weighted = _grads(a, b, lambda q: (tv * q).sum())
    summed = _grads(a, b, lambda q: q.sum())
    return AutogradDemo(
        a=a, b=b, v=v,
        q=q.detach().tolist(),
        grad_fn=type(q.grad_fn).__name__,
        graph=graph,
        vector_backward_error=error,
        a_grad=ta.grad.tolist(),
        b_grad=tb.grad.tolist(),
        analytic_a_grad=(9 * ta.detach() ** 2 * tv).tolist(),
        analytic_b_grad=(-2 * tb.detach() * tv).tolist(),
        jacobian_a=ja.tolist(),
        jacobian_b=jb.tolist(),
        jtv_a=jtv_a.tolist(),
        jtv_b=jtv_b.tolist(),
        jtv_matches=torch.allclose(jtv_a, ta.grad) and torch.allclose(jtv_b, tb.grad),
        max_abs_diff=diff,
        weighted_sum_a_grad=weighted[0],
        weighted_sum_b_grad=weighted[1],
        sum_a_grad=summed[0],
        sum_b_grad=summed[1],
        v_is_ones=all(x == 1.0 for x in v),
    )


def _q(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 3 * a**3 - b**2


def _leaf(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _grads(a: list[float], b: list[float], scalar) -> tuple[list[float], list[float]]:
    """Grads of ``a`` and ``b`` from ``scalar(Q).backward()`` on fresh leaves."""
    ta, tb = _leaf(a), _leaf(b)
    scalar(_q(ta, tb)).backward()
    return ta.grad.tolist(), tb.grad.tolist()


def _graph(node, leaves: dict[int, str]) -> dict:
    """The backward graph under ``node`` as nested dicts; AccumulateGrad names its leaf."""
    name = type(node).__name__
    if name == "AccumulateGrad":
        name += f" -> {leaves.get(id(node.variable), '?')}.grad"
    return {"node": name, "next": [_graph(n, leaves) for n, _ in node.next_functions if n is not None]}


# --------------------------------------------------------------------------------------------
# frozen layers


@dataclass
class TensorChange:
    """One tensor before and after the demo's SGD steps."""

    name: str
    role: str
    requires_grad: bool | None  # None for buffers
    sha256_before: str
    sha256_after: str
    identical: bool
    max_abs_change: float
    grad: str | None  # after each backward: "None" every step, "set" every step, "mixed"; None: buffer


@dataclass
class FrozenArm:
    """One run of the frozen-layer demo under one BatchNorm policy.

    Attributes:
        batchnorm: ``frozen`` or ``train``.
        bn_mode: Mode of ``layer1.0.bn1`` while training, ``eval`` or ``train``.
        tensors: The table rows.
        fingerprint_tensors: Tensors ``freeze.fingerprint`` promises are frozen: the frozen
            parameters, plus the frozen BatchNorm buffers under ``batchnorm: frozen``.
        fingerprint_identical: How many of them are bit-identical (sha256) after training.
        frozen_bn_layers: BatchNorm layers in the frozen part of the model.
        frozen_bn_drifted: How many of those changed their running statistics.
        losses: Loss at each step.
    """

    batchnorm: str
    bn_mode: str
    tensors: list[TensorChange]
    fingerprint_tensors: int
    fingerprint_identical: int
    frozen_bn_layers: int
    frozen_bn_drifted: int
    losses: list[float]


@dataclass
class FrozenDemo:
    """Everything ``freezetune demo frozen`` prints: one arm per BatchNorm policy."""

    steps: int
    seed: int
    batch_size: int
    image_size: int
    trainable: list[str]
    arms: list[FrozenArm]

    def to_dict(self) -> dict:
        """Returns plain JSON-able data."""
        return asdict(self)


def frozen_demo(steps: int = 3, seed: int = 0, batch_size: int = 8, image_size: int = 32) -> FrozenDemo:
    """Trains a random-init ResNet18 (layer4 + fc trainable) for a few SGD steps, twice.

    Both arms start from the same weights and see the same batches; they differ only in
    ``freeze.batchnorm``, so any difference in the frozen part comes from that policy.

    Args:
        steps: SGD steps per arm.
        seed: Seed for the weights, the images and the labels.
        batch_size: Images per step.
        image_size: Height and width of the random images.

    Raises:
        DemoInputError: If steps, batch_size or image_size is too small.
    """
    if steps < 1 or batch_size < 2 or image_size < 16:
        raise DemoInputError("need steps >= 1, batch size >= 2 (BatchNorm) and image size >= 16")
    arms = [_frozen_arm(policy, steps, seed, batch_size, image_size) for policy in ("frozen", "train")]
    return FrozenDemo(steps, seed, batch_size, image_size, list(FROZEN_DEMO_TRAINABLE), arms)


def _frozen_arm(batchnorm: str, steps: int, seed: int, batch_size: int, image_size: int) -> FrozenArm:
    """Trains one arm through the recipe (the same loop as ``freezetune train``), watching the tensors."""
    with tempfile.TemporaryDirectory(prefix="freezetune-demo-") as tmp:
        config = Config(
            seed=seed,
            device="cpu",
            model=ModelConfig(name="resnet18", num_classes=10, weights="none"),
            freeze=FreezeConfig(trainable=list(FROZEN_DEMO_TRAINABLE), batchnorm=batchnorm),
            data=DataConfig(image_size=image_size, batch_size=batch_size, train_size=steps * batch_size, val_size=0),
            train=TrainConfig(max_steps=steps, warmup_steps=0),
            output=OutputConfig(dir=tmp, overwrite=True),
        )
        recipe = Recipe(config).setup()
        model = recipe.model
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        before = {name: tensors[name].detach().clone() for name, _ in FROZEN_DEMO_TENSORS}
        frozen_bn = _frozen_region_bn(model)
        bn_before = {n: _bn_stats(m) for n, m in frozen_bn.items()}
        watched = {name: tensors[name] for name, _ in FROZEN_DEMO_TENSORS}
        losses, grad_seen = _train(recipe, watched)
        ended = recipe.finish(summary=False)
    rows = [
        _change(name, role, before[name], tensors[name], grad_seen[name])
        for name, role in FROZEN_DEMO_TENSORS
    ]
    return FrozenArm(
        batchnorm=batchnorm,
        bn_mode="train" if frozen_bn["layer1.0.bn1"].training else "eval",
        tensors=rows,
        fingerprint_tensors=ended.integrity["tensors_checked"],
        fingerprint_identical=ended.integrity["tensors_checked"] - len(ended.integrity["changed"]),
        frozen_bn_layers=len(frozen_bn),
        frozen_bn_drifted=sum(bn_before[n] != _bn_stats(m) for n, m in frozen_bn.items()),
        losses=losses,
    )


def _train(recipe: Recipe, watched: dict[str, torch.Tensor]) -> tuple[list[float], dict[str, set[bool]]]:
    """Runs the recipe's loop; records per watched tensor whether ``.grad`` was None after each step.

    Gradients stay in place from a step's backward until the next step clears them, so looking
    after the step sees what backward produced.
    """
    grad_seen: dict[str, set[bool]] = {name: set() for name in watched}
    losses = []
    for event in recipe.loop():
        if isinstance(event, StepRecord):
            for name, seen in grad_seen.items():
                seen.add(watched[name].grad is None)
            losses.append(event.loss)
    return losses, grad_seen


def _change(name: str, role: str, before: torch.Tensor, after: torch.Tensor, grad_none: set[bool]) -> TensorChange:
    is_param = isinstance(after, nn.Parameter)
    grad = ("None" if grad_none == {True} else "set" if grad_none == {False} else "mixed") if is_param else None
    delta = (after.detach().double() - before.double()).abs()
    return TensorChange(
        name=name,
        role=role,
        requires_grad=after.requires_grad if is_param else None,
        sha256_before=tensor_sha256(before),
        sha256_after=tensor_sha256(after),
        identical=tensor_sha256(before) == tensor_sha256(after),
        max_abs_change=delta.max().item() if delta.numel() else 0.0,
        grad=grad,
    )


def _frozen_region_bn(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm layers whose own parameters are all frozen."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and all(not p.requires_grad for p in m.parameters(recurse=False))
    }


def _bn_stats(bn: nn.Module) -> tuple[str, ...]:
    # running_mean, running_var and num_batches_tracked, by exact bytes.
    return tuple(tensor_sha256(buf) for buf in bn.buffers(recurse=False))
