"""Writes ``docs/schemas/*.schema.json``: the JSON Schema of every record freezetune writes, from its model.

    .venv/bin/python scripts/write_schemas.py           # (re)writes them
    .venv/bin/python scripts/write_schemas.py --check   # exits 1, naming them, if any is out of date

Each schema is the record's ``model_json_schema()`` (:func:`freezetune.records.schema_text`:
sorted keys, 2-space indent, a trailing newline). ``tests/test_schemas.py`` fails when a committed
schema differs from the generated one, so run this after changing a record.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from freezetune.records import schema_text

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "docs" / "schemas"
COMMAND = ".venv/bin/python scripts/write_schemas.py"

# File name under docs/schemas/ -> the record (module, class) it describes.
SCHEMAS = {
    "summary.schema.json": ("freezetune.training.summary", "RunSummary"),
    "epochs.schema.json": ("freezetune.training.summary", "EpochRecord"),  # one line of epochs.jsonl
    "compare.schema.json": ("freezetune.compare.result", "CompareResult"),  # compare.json and depths.json
    "sweep.schema.json": ("freezetune.sweep.result", "SweepResult"),
    "eval.schema.json": ("freezetune.evaluation", "EvalResult"),
}


def model(name: str):
    """The record class behind a schema file name."""
    module, cls = SCHEMAS[name]
    return getattr(importlib.import_module(module), cls)


def generated() -> dict[str, str]:
    """Every schema file's text as generated now, by file name."""
    return {name: schema_text(model(name)) for name in SCHEMAS}


def stale(folder: Path = SCHEMA_DIR) -> list[str]:
    """The schema files in ``folder`` that are missing or differ from the generated ones."""
    return [name for name, text in generated().items()
            if not (folder / name).is_file() or (folder / name).read_text() != text]


def write(folder: Path = SCHEMA_DIR) -> list[Path]:
    """Writes every schema into ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in generated().items():
        (folder / name).write_text(text)
        paths.append(folder / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a schema is out of date")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        if out_of_date:
            print(f"out of date in docs/schemas: {', '.join(out_of_date)}; run {COMMAND}", file=sys.stderr)
            return 1
        print(f"docs/schemas: {len(SCHEMAS)} schemas up to date")
        return 0
    for path in write():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
