"""Parameter accounting: total, trainable and frozen counts, overall and per top-level module."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> dict:
    """Counts parameters by ``requires_grad``, overall and per top-level child module.

    Returns:
        ``{"total", "trainable", "frozen", "trainable_pct", "by_module": {name: {...}}}``.
    """
    by_module: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        row = by_module.setdefault(top, {"total": 0, "trainable": 0, "frozen": 0})
        row["total"] += p.numel()
        row["trainable" if p.requires_grad else "frozen"] += p.numel()
    total = sum(r["total"] for r in by_module.values())
    trainable = sum(r["trainable"] for r in by_module.values())
    return {
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "trainable_pct": 100.0 * trainable / total if total else 0.0,
        "by_module": by_module,
    }


def trainable_line(counts: dict) -> str:
    """The one-line summary users know from PEFT's ``print_trainable_parameters``."""
    return (
        f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} "
        f"|| trainable%: {counts['trainable_pct']:.4f}"
    )
