"""``freezetune export``: a run's trainable-only checkpoint merged with its base into full weights."""

from __future__ import annotations

from pathlib import Path

import typer

from freezetune.cli.common import DEBUG_OPTION, OneLineCommand, console, print_all, user_errors


def register(app: typer.Typer) -> None:
    """Adds the command to the app."""
    app.command("export", cls=OneLineCommand)(export)


@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder holding checkpoint.trainable.safetensors.",
                                   show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="File to write: .safetensors (full weights) or .onnx; "
                             "a folder for --format peft.",
                             show_default=False),
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors: full weights for "
                            "model.weights=PATH (a LoRA run's adapters merged in); onnx: the folded eval-mode "
                            "network with a dynamic batch, checked against PyTorch with onnxruntime (needs the "
                            "onnx extra); peft: a LoRA run's adapter folder for peft.PeftModel.from_pretrained."),
    base: Path = typer.Option(
        None, "--base", help="Weights file the run started from (default: rebuild it from the run's "
        "config: random init from its seed, ImageNet, or its weights file).", show_default=False,
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Merge base weights + trainable checkpoint into full weights, or export the model to ONNX.

    Refuses a base whose frozen weights differ (sha256) from the ones the run trained on. An ONNX
    file is written only once onnxruntime's logits match PyTorch's.
    """
    from freezetune.errors import ConfigError
    from freezetune.export import export_onnx, export_peft, export_run
    from freezetune.render.export import export_lines, onnx_lines, peft_lines

    if fmt == "safetensors":
        print_all(console, export_lines(export_run(run_dir, out, base=base, overwrite=overwrite)))
    elif fmt == "onnx":
        print_all(console, onnx_lines(export_onnx(run_dir, out, base=base, overwrite=overwrite)))
    elif fmt == "peft":
        print_all(console, peft_lines(export_peft(run_dir, out, base=base, overwrite=overwrite)))
    else:
        raise ConfigError(f"--format {fmt!r}: choose safetensors, onnx or peft")
