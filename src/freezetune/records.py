"""The one style of every record freezetune writes to disk, and the shapes several records share.

Every record (``summary.json``, ``epochs.jsonl``, ``compare.json``/``depths.json``, ``sweep.json``,
``eval.json``) is a pydantic model derived from :class:`Record`: every key is declared, a key no
field declares is an error (so a record that grows an undeclared key fails where it is written,
not in a reader), and each top-level record carries a ``schema_version``. A sub-dict whose shape
is known is a record of its own, one class name per shape: a shape that more than one record
holds (a step-time summary, an execution path...) is defined here, once.

The JSON Schemas in ``docs/schemas/`` are generated from these models by
``scripts/write_schemas.py`` (:func:`schema_text`); ``tests/test_schemas.py`` fails when they
are out of date. This module sits at the bottom of the import layers: pydantic and the standard
library only.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """The base of every record written to disk: every key declared, none other accepted."""

    model_config = ConfigDict(extra="forbid")


def schema_text(model: type[BaseModel]) -> str:
    """A record's JSON Schema as committed under ``docs/schemas/``: sorted keys, 2-space indent, newline."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------------
# Shapes held by more than one record


class Versions(Record):
    """The library versions a record was made with."""

    torch: str
    torchvision: str


class WeightsOrigin(Record):
    """Where a model's starting weights came from."""

    source: str  # imagenet | random-init | the weights file path
    notice: str | None  # a warning for the user (e.g. ``auto`` fell back to random init)


class ParamCounts(Record):
    """Parameters by ``requires_grad`` (``freezing.params.count_params`` without ``by_module``)."""

    total: int
    trainable: int
    frozen: int
    trainable_pct: float


class TimingStats(Record):
    """Step times summarised (``measure.timing.timing_stats``); all null when no step was timed."""

    steps_timed: int
    step_median_s: float | None
    step_p10_s: float | None
    step_p90_s: float | None
    step_mean_s: float | None
    samples_per_s: float | None


class LossEnds(Record):
    """The training loss of the first and the last step (null without steps)."""

    first: float | None
    last: float | None


class CacheChoice(Record):
    """Whether the feature cache is used, and why."""

    enabled: bool
    reason: str


class ExecutionReasons(Record):
    """Why each choice of the execution path was made (``speed.execution.ExecutionPlan``'s choices)."""

    prefix_without_autograd: str
    fold_batchnorm: str
    prefix_channels_last: str
    feature_cache: str
    channels_last: str
    compile: str
    ddp: str


class Execution(Record):
    """How every training step runs (``Engine.speed()``: ``ExecutionPlan.as_dict`` and the folded copy's bytes)."""

    frozen_prefix: list[str]
    prefix_without_autograd: bool
    folded_batchnorm: bool
    prefix_channels_last: bool
    feature_cache: CacheChoice
    precision: str
    channels_last: bool
    compile: bool
    ddp: bool
    reasons: ExecutionReasons
    folded_prefix_bytes: int
