"""``freezetune demo autograd`` and ``freezetune demo frozen``: worked examples, printed."""

from __future__ import annotations

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, OneLineGroup, console, user_errors

demo_app = typer.Typer(
    cls=OneLineGroup,
    help="Worked examples: what autograd computes and what freezing does.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def register(app: typer.Typer) -> None:
    """Adds the ``demo`` command group to the app."""
    app.add_typer(demo_app, name="demo")


@demo_app.command("autograd", cls=OneLineCommand)
@user_errors
def autograd(
    a: str = typer.Option("2,3", "--a", help="Values of a, comma-separated."),
    b: str = typer.Option("6,4", "--b", help="Values of b, as many as a."),
    v: str = typer.Option(None, "--v", help="External gradient v for Q.backward(gradient=v) "
                          "\\[default: all ones]", show_default=False),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Q = 3a^3 - b^2: what Q.backward(gradient=v) computes, and how to choose v."""
    from freezetune.demo import autograd_demo, parse_vector
    from freezetune.render.demo import render_autograd

    vec = parse_vector(v, "v") if v is not None else None
    result = autograd_demo(parse_vector(a, "a"), parse_vector(b, "b"), vec)
    console.print(render_autograd(result.to_dict()))


@demo_app.command("frozen", cls=OneLineCommand)
@user_errors
def frozen(
    steps: int = typer.Option(3, "--steps", min=1, max=100, help="SGD steps per run."),
    seed: int = typer.Option(0, "--seed", help="Seed for the weights and the random batches."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """A few SGD steps on ResNet18: frozen weights stay bit-identical, BatchNorm may not."""
    from freezetune.demo import frozen_demo
    from freezetune.render.demo import render_frozen

    console.print(render_frozen(frozen_demo(steps=steps, seed=seed).to_dict()))
