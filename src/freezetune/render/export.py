"""What ``freezetune export`` prints: the merged weights written, and how to use them."""

from __future__ import annotations

from freezetune.render.format import fmt_bytes


def export_lines(done: dict) -> list[str]:
    """The lines for a finished export, from the dict ``export_run`` returns."""
    return [
        f"wrote {done['out']} ({fmt_bytes(done['bytes'])}): base {done['base']} + "
        f"{done['tensors_from_checkpoint']} trained tensors ({fmt_bytes(done['trainable_bytes'])}) "
        f"from step {done['step']}",
        f"use it with: model.weights={done['out']}",
    ]
