"""The run folder: creating it safely, the per-step metrics log, and reading it back.

Files in it are written atomically through :mod:`freezetune.atomic`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from freezetune.errors import RunDirError


def prepare_run_dir(path: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Creates the run folder, refusing to reuse a non-empty one unless allowed.

    Args:
        path: The folder.
        overwrite: Whether an existing non-empty folder may be written into.
        resume: Whether the folder is being continued (it must then exist).

    Raises:
        RunDirError: If the folder holds a previous run, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output.dir {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise RunDirError(
            f"output.dir {path}: folder is not empty; choose another output.dir "
            "or set output.overwrite=true"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunDirError(f"output.dir {path}: cannot write there ({e.strerror or e})") from None
    return path


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a killed run keeps every finished step."""

    def __init__(self, path: str | Path | None, append: bool = False):
        # path None: a log that keeps nothing (ranks other than 0 in distributed training).
        self._f = open(path, "a" if append else "w", encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, record: dict) -> None:
        """Writes one record and flushes it to the OS."""
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        """Closes the file."""
        if self._f is not None:
            self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a JSON-lines file (ignores a torn last line from a killed writer)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
