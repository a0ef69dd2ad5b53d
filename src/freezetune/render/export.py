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


def onnx_lines(done: dict) -> list[str]:
    """The lines for a finished ONNX export, from the dict ``export_onnx`` returns."""
    fold, check = done["fold"], done["check"]
    data = f" + {done['data_file']}" if done["data_file"] else ""
    folded = (f"{fold['batchnorm_folded']} of {fold['batchnorm_before']} BatchNorm folded ({fold['method']})"
              if fold["batchnorm_before"] else "no BatchNorm")
    return [
        f"wrote {done['out']}{data} ({fmt_bytes(done['bytes'])}): {done['model']}, {done['num_classes']} classes, "
        f"step {done['step']}, opset {done['opset']}",
        f"input images: float32\\[batch, 3, {done['input'][2]}, {done['input'][3]}] (batch dynamic), "
        f"output logits; {folded}",
        f"checked: {check['runtime']} at batch {', '.join(map(str, check['batches']))}: max |diff| "
        f"{check['max_abs_diff']:.2e} (tolerance {check['atol']:g} + {check['rtol']:g}*|logit|)",
    ]


def peft_lines(done: dict) -> list[str]:
    """The lines for a written peft adapter, from the dict ``export_peft`` returns."""
    return [
        f"wrote {done['out']} ({fmt_bytes(done['bytes'])}): LoRA rank {done['rank']} on {done['targets']} "
        f"convolutions and the head, {done['tensors']} tensors, step {done['step']}, base {done['base']}",
        f"load it with: peft.PeftModel.from_pretrained(<the base model>, {done['out']!r})",
    ]
