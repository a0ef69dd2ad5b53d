"""What a freeze plan does to a model, measured without training: ``freezetune inspect``.

Everything here runs on the ``meta`` device (shapes and dtypes, no data), so inspecting a model
at the config's real batch size and image size is instant and needs no GPU and no dataset. Meta
tensors go through the same autograd machinery as real ones: the same graph nodes are created and
the same tensors are saved for backward, so the counts below are what a real step would build.

The figures compare the config's freeze plan against the same model fully trainable:

* FLOPs per step (:func:`freezetune.measure.flops.step_flops`), forward and backward.
* Activation memory: bytes of the tensors autograd saves during forward to use in backward
  (unique storages, parameters excluded), found with ``torch.autograd.graph.saved_tensors_hooks``.
* The autograd graph: nodes reachable from ``loss.grad_fn`` and which parameters it reaches.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from freezetune.config import Config, ModelConfig
from freezetune.errors import WeightsError
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import FreezePlan, apply_freeze, unfreeze_all
from freezetune.measure.flops import forward_flops_by_module, step_flops
from freezetune.measure.memory import SavedActivations
from freezetune.models.lean import make_lean
from freezetune.models.lora import has_lora, merge_lora
from freezetune.models.weights import LoadedModel, build_model, imagenet_state_dict
from freezetune.speed.execution import plan_execution

# What the activation-memory figure is, printed next to it and stored in the JSON.
ACTIVATION_MEMORY_WHAT = (
    "tensors autograd keeps from forward for backward (unique storages, not parameters), "
    "on the meta device at the config's batch and image size in the model's dtype; a lower "
    "bound on real activation memory (no allocator overhead, temporaries or gradients)"
)


@dataclass
class ModuleRow:
    """One module of the tree.

    Attributes:
        name: Dotted module name (``""`` is the whole model).
        depth: 0 for the whole model, 1 for top-level modules, 2 for their children...
        kind: The module's class name.
        params: Parameters inside the module (recursively).
        trainable_params: Of those, how many have ``requires_grad``.
        trainable: ``yes``, ``no``, ``partial``, or ``-`` when the module has no parameters.
        forward_flops: Forward FLOPs for one image.
        batchnorm: ``train``/``eval``/``mixed`` for the BatchNorm layers inside, None if none.
        batchnorm_layers: ``{"train": n, "eval": n}`` BatchNorm layers inside, by mode.
        in_backward_graph: Whether the module's output requires grad, i.e. backward passes
            through it; None when not traced.
    """

    name: str
    depth: int
    kind: str
    params: int
    trainable_params: int
    trainable: str
    forward_flops: int
    batchnorm: str | None
    batchnorm_layers: dict[str, int]
    in_backward_graph: bool | None


@dataclass
class GraphStats:
    """What one forward pass records for backward.

    Attributes:
        nodes: Autograd nodes reachable from ``loss.grad_fn`` (AccumulateGrad included).
        accumulate_grad: AccumulateGrad nodes: one per parameter that will receive ``.grad``.
        trainable_params_reached: Trainable parameter tensors the graph reaches.
        frozen_params_reached: Frozen parameter tensors the graph reaches (0: frozen is skipped).
        node_types: Count of nodes per class name, e.g. ``ConvolutionBackward0``.
        saved_tensors: Unique non-parameter storages saved for backward.
        saved_bytes: Their total size in bytes.
        modules_outside_graph: Dotted names of modules whose output does not require grad:
            backward never reaches them.
    """

    nodes: int
    accumulate_grad: int
    trainable_params_reached: int
    frozen_params_reached: int
    node_types: dict[str, int]
    saved_tensors: int
    saved_bytes: int
    modules_outside_graph: list[str] = field(default_factory=list)


@dataclass
class Inspection:
    """The whole ``freezetune inspect`` report; :meth:`to_dict` gives the JSON."""

    model: str
    weights_source: str
    weights_notice: str | None
    freeze: dict
    batch_size: int
    image_size: int
    depth: int
    params: dict
    modules: list[ModuleRow]
    step_flops: dict[str, dict[str, int]]
    predicted_speedup: float
    activation_memory: dict
    graph: dict[str, GraphStats]
    outside_backward_graph: list[str]
    execution: dict = field(default_factory=dict)  # how train would run this freeze state, with reasons

    def to_dict(self) -> dict:
        """Returns plain JSON-able data."""
        return asdict(self)


def load_for_inspection(cfg: ModelConfig) -> LoadedModel:
    """Builds the model as configured, but never touches the network.

    ``auto`` and ``imagenet`` use torchvision's cache when the file is there and otherwise fall
    back to random init with a notice: the freeze structure, FLOPs and graph do not depend on
    weight values. A weights file is loaded as configured (a missing file is still an error).

    Raises:
        WeightsError: If a configured weights file is missing or does not fit.
    """
    if cfg.weights in ("auto", "imagenet"):
        try:
            imagenet_state_dict(cfg.name, allow_download=False)
        except WeightsError:
            loaded = build_model(cfg.model_copy(update={"weights": "none"}))
            loaded.notice = (
                f"model.weights is {cfg.weights} but ImageNet weights are not in torchvision's "
                "cache; inspecting a randomly initialised model instead (the freeze structure, "
                "FLOPs and autograd graph do not depend on weight values)"
            )
            return loaded
    return build_model(cfg)


def inspect_config(config: Config, depth: int = 2) -> Inspection:
    """Inspects the config's model under its freeze plan, against the model fully trainable.

    Args:
        config: The validated config; its model, freeze and data sections are used.
        depth: Deepest module level listed (1: top-level modules, 2: also their blocks).

    Returns:
        The Inspection report.

    Raises:
        FreezeError: If the freeze spec does not apply to the model.
        WeightsError: If a configured weights file cannot be loaded.
    """
    torch.manual_seed(config.seed)
    loaded = load_for_inspection(config.model)
    model = loaded.model
    plan = apply_freeze(model, config.freeze, config.model.name, config.adapt)
    if config.train.lean_backward:
        make_lean(model)  # and so the full baseline, copied from it: both keep what the run would
    full = copy.deepcopy(model)
    if has_lora(full):
        merge_lora(full)  # full fine-tuning has no adapters: the plain network, everything training
    unfreeze_all(full)
    batch, size, classes = config.data.batch_size, config.data.image_size, config.model.num_classes

    frozen_flops = step_flops(model, batch, size, classes)
    full_flops = step_flops(full, batch, size, classes)
    graphs = {"frozen": trace_graph(model, batch, size), "full": trace_graph(full, batch, size)}
    outside = set(graphs["frozen"].modules_outside_graph)
    rows = module_rows(model, depth, forward_flops_by_module(model, size), outside)
    saved = graphs["full"].saved_bytes - graphs["frozen"].saved_bytes
    return Inspection(
        model=config.model.name,
        weights_source=loaded.weights_source,
        weights_notice=loaded.notice,
        freeze=_freeze_summary(config, plan),
        batch_size=batch,
        image_size=size,
        depth=depth,
        params=count_params(model),
        modules=rows,
        step_flops={"frozen": frozen_flops, "full": full_flops},
        predicted_speedup=full_flops["total"] / frozen_flops["total"],
        activation_memory={
            "frozen_bytes": graphs["frozen"].saved_bytes,
            "full_bytes": graphs["full"].saved_bytes,
            "saved_bytes": saved,
            "saved_pct": 100.0 * saved / graphs["full"].saved_bytes if graphs["full"].saved_bytes else 0.0,
            "what": ACTIVATION_MEMORY_WHAT,
        },
        graph=graphs,
        outside_backward_graph=_outside_graph(graphs["frozen"].modules_outside_graph),
        execution=plan_execution(model, plan, config, _device_type(config.device)).as_dict(),
    )


def _device_type(device: str) -> str:
    """The device type a run of this config would use, without initialising (or requiring) CUDA."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _outside_graph(outside: list[str]) -> list[str]:
    """Top-level modules backward never reaches.

    For a model whose trunk is one container (MobileNet's ``features``), the first level down
    that has any, whatever depth the table shows.
    """
    for level in range(1, max((n.count(".") + 1 for n in outside), default=0) + 1):
        names = [n for n in outside if n.count(".") + 1 == level]
        if names:
            return names
    return []


def module_rows(
    model: nn.Module, depth: int, flops: dict[str, int], outside_graph: set[str] | None = None
) -> list[ModuleRow]:
    """One row per module down to ``depth`` levels, in ``named_modules`` order, whole model first.

    Args:
        model: The model with its freeze plan applied and in training mode.
        depth: Deepest level listed.
        flops: Forward FLOPs per module name, from :func:`forward_flops_by_module`.
        outside_graph: Names of modules backward never reaches; None leaves ``in_backward_graph``
            unset.
    """
    rows = []
    for name, mod in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if level > depth:
            continue
        params = list(mod.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        bn = Counter(
            "train" if m.training else "eval"
            for m in mod.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        )
        rows.append(ModuleRow(
            name=name,
            depth=level,
            kind=type(mod).__name__,
            params=total,
            trainable_params=trainable,
            trainable=_trainable_word(total, trainable),
            forward_flops=flops.get(name, 0),
            batchnorm=("mixed" if len(bn) > 1 else next(iter(bn))) if bn else None,
            batchnorm_layers={"train": bn["train"], "eval": bn["eval"]},
            in_backward_graph=None if outside_graph is None else name not in outside_graph,
        ))
    return rows


def trace_graph(model: nn.Module, batch_size: int, image_size: int) -> GraphStats:
    """Runs one forward and loss on a meta copy and records what autograd keeps for backward.

    The model's ``requires_grad`` flags and train/eval modes are kept (a deep copy is traced).
    Saved bytes match a real CPU forward exactly when every BatchNorm in the backward graph is in
    train mode; an eval-mode BatchNorm inside the graph (a frozen layer after a trainable one)
    saves two per-channel vectors on meta that CPU and cuDNN kernels leave empty.
    """
    meta = copy.deepcopy(model).to("meta")
    param_names = {id(p): n for n, p in meta.named_parameters()}
    in_graph: list[str] = []
    hooks = [
        mod.register_forward_hook(_record_requires_grad(name, in_graph))
        for name, mod in meta.named_modules()
    ]
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    try:
        with SavedActivations(meta) as saved:  # weights are held by the model anyway: activations only
            logits = meta(x)
            y = torch.zeros(batch_size, dtype=torch.long, device="meta")
            loss = nn.functional.cross_entropy(logits, y)
    finally:
        for h in hooks:
            h.remove()
    nodes = graph_nodes(loss.grad_fn)
    reached = [param_names.get(id(n.variable)) for n in nodes if type(n).__name__ == "AccumulateGrad"]
    frozen_names = {n for n, p in meta.named_parameters() if not p.requires_grad}
    return GraphStats(
        nodes=len(nodes),
        accumulate_grad=len(reached),
        trainable_params_reached=sum(1 for n in reached if n not in frozen_names),
        frozen_params_reached=sum(1 for n in reached if n in frozen_names),
        node_types=dict(Counter(type(n).__name__ for n in nodes).most_common()),
        saved_tensors=saved.tensors,
        saved_bytes=saved.nbytes,
        modules_outside_graph=[n for n, _ in meta.named_modules() if n and n not in in_graph],
    )


def graph_nodes(root) -> list:
    """All autograd nodes reachable from ``root`` through ``next_functions`` (root included).

    Args:
        root: A ``grad_fn`` (e.g. ``loss.grad_fn``), or None for a tensor outside any graph.
    """
    seen: dict[int, object] = {}  # holding the nodes keeps their Python objects (and ids) alive
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(nxt for nxt, _ in node.next_functions)
    return list(seen.values())


def _record_requires_grad(name: str, out: list[str]):
    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad and name not in out:
            out.append(name)

    return hook


def _trainable_word(total: int, trainable: int) -> str:
    if total == 0:
        return "-"
    if trainable == total:
        return "yes"
    return "no" if trainable == 0 else "partial"


def _freeze_summary(config: Config, plan: FreezePlan) -> dict:
    spec = config.freeze
    return {
        "trainable": spec.trainable,
        "frozen": spec.frozen,
        "until": spec.until,
        "batchnorm": spec.batchnorm,
        "adapt": plan.adapt,
        "frozen_batchnorm_layers": len(plan.frozen_bn),
        "trainable_tensors": len(plan.trainable),
        "frozen_tensors": len(plan.frozen),
    }
