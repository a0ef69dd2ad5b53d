"""``freezetune models``: the models freezetune can fine-tune and their freeze points."""

from __future__ import annotations

import json

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, console, print_all, user_errors


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("models", cls=OneLineCommand)(models)


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
    from freezetune.models.listing import catalog
    from freezetune.render.models import model_detail, models_list

    infos = catalog(pattern, num_classes)
    rows = [i.to_row() for i in infos]
    if as_json:
        typer.echo(json.dumps({"num_classes": num_classes, "models": rows}, indent=2))
    elif len(infos) == 1 and pattern == infos[0].name:
        print_all(console, model_detail(rows[0], num_classes))
    else:
        print_all(console, models_list(rows))
