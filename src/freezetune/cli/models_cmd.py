"""``freezetune models``: the models freezetune can fine-tune and their freeze points."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.table import Table

from freezetune.cli.common import DEBUG_OPTION, console, user_errors


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("models")(models)


@user_errors
def models(
    pattern: str = typer.Argument(
        None, help="A model name, or a glob such as 'mobilenet*'; one name shows its stages in detail.",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    num_classes: int = typer.Option(
        1000, "--num-classes", min=1, help="Head size for the parameter counts (torchvision's is 1000)."
    ),
    debug: bool = DEBUG_OPTION,
) -> None:
    """List the torchvision classification models and their freeze points (for freeze.until).

    Parameter counts come from models built on the meta device: no weights, no memory.
    """
    from freezetune.models.catalog import catalog

    infos = catalog(pattern, num_classes)
    if as_json:
        rows = [{**asdict(i), "freeze_points": i.freeze_points} for i in infos]
        typer.echo(json.dumps({"num_classes": num_classes, "models": rows}, indent=2))
    elif len(infos) == 1 and pattern == infos[0].name:
        _print_detail(infos[0], num_classes)
    else:
        _print_list(infos)


def _print_list(infos: list) -> None:
    from freezetune.models.catalog import compact_points

    table = Table(title=f"torchvision classification models ({len(infos)})", title_justify="left")
    table.add_column("family")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("freeze points (for freeze.until; the head always trains)")
    family = None
    for info in infos:
        if family is not None and info.family != family:
            table.add_section()
        name = f"[bold]{info.name}[/] (default)" if info.default else info.name
        points = compact_points(info.freeze_points)
        table.add_row(info.family if info.family != family else "", name, _millions(info.params), points)
        family = info.family
    console.print(table)
    console.print(
        "ResNets also get frozen-prefix execution (no autograd, folded BatchNorm, feature cache); "
        "other models run their plain forward. Details: freezetune models NAME"
    )


def _print_detail(info, num_classes: int) -> None:
    table = Table(
        title=f"{info.name}: freeze points ({info.params:,} params with a {num_classes}-class head)",
        title_justify="left",
    )
    table.add_column("freeze point")
    table.add_column("covers")
    table.add_column("params", justify="right")
    table.add_column("trainable with freeze.until", justify="right")
    for stage, members in info.stages.items():
        left = info.trainable_until.get(stage)
        trainable = "-" if left is None else f"{left:,} ({100.0 * left / info.params:.1f}%)"
        table.add_row(stage, " ".join(members), f"{info.stage_params[stage]:,}", trainable)
    console.print(table)
    console.print(f"family {info.family}: {info.rule}")
    console.print(f"head: {info.head} is replaced to give model.num_classes outputs")
    if not info.fast_path:
        console.print("frozen-prefix execution (folded BatchNorm, feature cache) is ResNet-only: plain forward")
    example = info.freeze_points[len(info.freeze_points) // 2]
    console.print(f"e.g. freezetune train -c CONFIG model.name={info.name} freeze.until={example}")


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"
