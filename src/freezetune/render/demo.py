"""Rich rendering of ``freezetune demo autograd`` and ``freezetune demo frozen``.

Both read the plain dicts of ``AutogradDemo.to_dict()`` / ``FrozenDemo.to_dict()`` and fit an
80-column terminal.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from freezetune.render.format import mat, num, vec

# How many hex digits of a sha256 the table shows (the JSON-able data keeps all 64).
HASH_CHARS = 8


# --------------------------------------------------------------------------------------------
# autograd


def render_autograd(d: dict) -> RenderableType:
    """Renders ``AutogradDemo.to_dict()`` for an 80-column terminal."""
    v_text = vec(d["v"]) + (" (all ones)" if d["v_is_ones"] else "")
    intro = Text.from_markup(
        "[bold]Q = 3a^3 - b^2[/], with a and b leaf tensors (requires_grad=True, float64)\n"
        f"  a = {vec(d['a'])}   b = {vec(d['b'])}   ->   Q = {vec(d['q'])}\n\n"
        f"Q.grad_fn = [bold]{d['grad_fn']}[/]; the graph autograd recorded for backward:"
    )
    graph = _tree(d["graph"])
    calls = Text.from_markup(
        "\nQ is a vector, so [bold]Q.backward()[/] alone fails:\n"
        f"  RuntimeError: {escape(d['vector_backward_error'])}\n"
        f"It needs v = dL/dQ: [bold]Q.backward(gradient=v)[/] with v = {v_text}\n\n"
        "Explicit Jacobians (torch.autograd.functional.jacobian; diagonal, since\n"
        "Q_i depends only on a_i and b_i):\n"
        f"  J_a = dQ/da = {mat(d['jacobian_a'])}\n"
        f"  J_b = dQ/db = {mat(d['jacobian_b'])}"
    )
    ok = "[green]yes[/]" if d["jtv_matches"] else "[red]NO[/]"
    closing = Text.from_markup(
        f"J^T v equals the grads from backward: {ok} (max difference {d['max_abs_diff']:g}).\n"
        "So backward computes the vector-Jacobian product J^T v without building J.\n\n"
        "[bold]How to choose v?[/] v is dL/dQ for the scalar L you actually care about.\n"
        "For L = Q.sum(), dL/dQ is all ones: that is the default here, and\n"
        "Q.sum().backward() gives the same grads as Q.backward(gradient=ones).\n"
        "Any v is the gradient of L = (v * Q).sum(), as the table shows."
    )
    return Group(intro, graph, calls, Text(""), grads_table(d), closing)


def grads_table(d: dict) -> Table:
    """a.grad and b.grad computed five ways."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1), title_justify="left",
                  title="a.grad and b.grad, five ways")
    table.add_column("computed by")
    table.add_column("a.grad")
    table.add_column("b.grad")
    table.add_row("Q.backward(gradient=v)", vec(d["a_grad"]), vec(d["b_grad"]))
    table.add_row("by hand: 9a^2 * v, -2b * v", vec(d["analytic_a_grad"]), vec(d["analytic_b_grad"]))
    table.add_row("J^T v, J explicit", vec(d["jtv_a"]), vec(d["jtv_b"]))
    table.add_row("(v * Q).sum().backward()", vec(d["weighted_sum_a_grad"]), vec(d["weighted_sum_b_grad"]))
    table.add_row("Q.sum().backward()  v=ones", vec(d["sum_a_grad"]), vec(d["sum_b_grad"]))
    return table


def _tree(node: dict, tree: Tree | None = None) -> Tree:
    branch = Tree(node["node"]) if tree is None else tree.add(node["node"])
    for child in node["next"]:
        _tree(child, branch)
    return branch


# --------------------------------------------------------------------------------------------
# frozen


def render_frozen(d: dict) -> RenderableType:
    """Renders ``FrozenDemo.to_dict()`` for an 80-column terminal."""
    intro = Text(
        f"ResNet18, random init, 10 classes; trainable: {', '.join(d['trainable'])}; the rest is "
        f"frozen.\n{d['steps']} SGD steps on random {d['image_size']}x{d['image_size']} images, "
        f"batch {d['batch_size']}, seed {d['seed']}. Both runs start from the same weights and "
        "see the same batches; only freeze.batchnorm differs."
    )
    parts: list[RenderableType] = [intro]
    for arm in d["arms"]:
        parts += [Text(""), arm_table(arm), arm_summary(arm)]
    first = {arm["batchnorm"]: arm["losses"][0] for arm in d["arms"]}
    parts += [Text(""), Text.from_markup(
        "[bold]Frozen parameters[/] have requires_grad=False: backward never writes their .grad\n"
        "and the optimizer never holds them, so they stay bit-identical in both runs.\n"
        "[bold]BatchNorm running statistics[/] are buffers, not parameters: requires_grad does\n"
        "not protect them. In train mode every forward pass updates them, so the frozen\n"
        "layers change anyway. batchnorm: frozen keeps those layers in eval mode\n"
        "(freeze.set_train_mode); they then normalise with the stored statistics\n"
        "instead of the batch's, which is why the first loss already differs: "
        + ", ".join(f"{k} {v:.4f}" for k, v in first.items()) + "."
    )]
    return Group(*parts)


def arm_table(arm: dict) -> Table:
    """Before/after table of the tracked tensors for one BatchNorm policy."""
    table = Table(
        title=f"batchnorm: {arm['batchnorm']}  (layer1.0.bn1 runs in {arm['bn_mode']} mode)",
        title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1),
    )
    table.add_column("tensor (layer1 frozen, fc trains)", no_wrap=True)
    table.add_column(".grad")
    table.add_column("before", no_wrap=True)
    table.add_column("after", no_wrap=True)
    table.add_column("max change", justify="right")
    for row in arm["tensors"]:
        same = row["identical"]
        after = row["sha256_after"][:HASH_CHARS]
        table.add_row(
            row["name"],
            row["grad"] or "-",
            row["sha256_before"][:HASH_CHARS],
            f"[green]{after}[/]" if same else f"[yellow]{after}[/]",
            "0 (same)" if same else num(row["max_abs_change"]),
        )
    table.caption = f"before/after: first {HASH_CHARS} hex digits of sha256 of the exact bytes"
    table.caption_justify = "left"
    return table


def arm_summary(arm: dict) -> Text:
    """One line per arm: freeze integrity and BatchNorm drift over the whole model."""
    return Text(
        f"{arm['fingerprint_identical']} of {arm['fingerprint_tensors']} tensors in "
        f"freeze.fingerprint bit-identical; running stats moved in {arm['frozen_bn_drifted']} "
        f"of {arm['frozen_bn_layers']} frozen BatchNorm layers. Loss "
        + " -> ".join(f"{x:.4f}" for x in arm["losses"]) + "."
    )
