"""Rich rendering of ``freezetune models``: the catalog as a table, one model's freeze points in detail.

Both read the plain dicts ``freezetune models --json`` prints (``ModelInfo.to_row`` in
:mod:`freezetune.models.listing`: the fields plus ``freeze_points``) and return what to print, in
order. Plain data in, text out: nothing of freezetune's is imported but ``render.format``.
"""

from __future__ import annotations

import re

from rich.console import RenderableType
from rich.table import Table

from freezetune.render.format import fmt_int, fmt_millions, fmt_percent


def models_list(models: list[dict]) -> list[RenderableType]:
    """One row per model, grouped by family, with its parameters and freeze points; then a note."""
    table = Table(title=f"torchvision classification models ({len(models)})", title_justify="left")
    table.add_column("family")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("freeze points (for freeze.until; the head always trains)")
    family = None
    for m in models:
        if family is not None and m["family"] != family:
            table.add_section()
        name = f"[bold]{m['name']}[/] (default)" if m["default"] else m["name"]
        points = compact_points(m["freeze_points"])
        table.add_row(m["family"] if m["family"] != family else "", name, fmt_millions(m["params"]), points)
        family = m["family"]
    return [
        table,
        "ResNets also get frozen-prefix execution (no autograd, folded BatchNorm, feature cache); "
        "other models run their plain forward. Details: freezetune models NAME",
    ]


def model_detail(m: dict, num_classes: int) -> list[RenderableType]:
    """One model's freeze points: what each covers, its parameters and what trains with freeze.until."""
    table = Table(
        title=f"{m['name']}: freeze points ({fmt_int(m['params'])} params with a {num_classes}-class head)",
        title_justify="left",
    )
    table.add_column("freeze point")
    table.add_column("covers")
    table.add_column("params", justify="right")
    table.add_column("trainable with freeze.until", justify="right")
    for stage, members in m["stages"].items():
        left = m["trainable_until"].get(stage)
        trainable = "-" if left is None else f"{fmt_int(left)} ({fmt_percent(100.0 * left / m['params'])})"
        table.add_row(stage, " ".join(members), fmt_int(m["stage_params"][stage]), trainable)
    parts: list[RenderableType] = [
        table,
        f"family {m['family']}: {m['rule']}",
        f"head: {m['head']} is replaced to give model.num_classes outputs",
    ]
    if m.get("blocks"):
        parts.append(f"block points (freeze.until, compare depths --points, freeze.auto's units): "
                     f"{compact_points(m['blocks'])}")
    if not m["fast_path"]:
        parts.append("frozen-prefix execution (folded BatchNorm, feature cache) is ResNet-only: plain forward")
    points = m["freeze_points"]
    parts.append(f"e.g. freezetune train -c CONFIG model.name={m['name']} freeze.until={points[len(points) // 2]}")
    return parts


def compact_points(points: list[str]) -> str:
    """``a, b, encoder_layer_0..encoder_layer_11, c``: runs of numbered names shortened."""
    out: list[str] = []
    i = 0
    while i < len(points):
        m = re.fullmatch(r"(.*?)(\d+)", points[i])
        j = i
        while m and j + 1 < len(points) and points[j + 1] == f"{m.group(1)}{int(m.group(2)) + j + 1 - i}":
            j += 1
        out.append(points[i] if j - i < 2 else f"{points[i]}..{points[j]}")
        i = j + 1
    return ", ".join(out)
