"""Data files of evaluator tasks: JSONL, JSON, CSV and Parquet, as lists of records.

JSONL/JSON/CSV need only the standard library; Parquet is read with pyarrow (imported
lazily; the ``data`` extra). pyarrow is the one dependency because it reads Parquet
itself, while pandas would need pyarrow (or fastparquet) for it anyway.

Every error is one line naming the file (and the task and field where they apply).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from npstune.errors import ConfigError, missing

FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def read_records(path: Path, task: str = "", split: str = "") -> list[dict[str, Any]]:
    """Every row of a data file as a dict; ConfigError if missing,
    unreadable or empty."""
    where = _where(path, task, split)
    if not path.is_file():
        raise ConfigError(f"{where}: data file not found")
    suffix = path.suffix.lower()
    try:
        rows: list[Any]
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ConfigError(
                                f"{where}: line {i} is not valid JSON ({exc.msg})"
                            ) from None
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ConfigError(f"{where}: expected a JSON list of records")
            rows = data
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise missing("data", "pyarrow") from None
            rows = pq.read_table(path).to_pylist()
        else:
            raise ConfigError(
                f"{where}: unknown data format {suffix or '(none)'!r}; "
                f"use one of {', '.join(FORMATS)}"
            )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: unreadable ({exc})") from None
    if not rows:
        raise ConfigError(f"{where}: empty split (no records)")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, Mapping):
            raise ConfigError(f"{where}: record {i} is not an object")
    return [dict(r) for r in rows]


def require(
    rows: Iterable[Mapping[str, Any]],
    fields: Iterable[str],
    path: Path,
    task: str = "",
    split: str = "",
) -> None:
    """ConfigError naming the first record that lacks one of ``fields``."""
    need = list(fields)
    for i, r in enumerate(rows, 1):
        for f in need:
            if f not in r or r[f] is None:
                raise ConfigError(
                    f"{_where(path, task, split)}: record {i} has no field {f!r}"
                )


def _where(path: Path, task: str, split: str) -> str:
    parts = [str(path)]
    if task:
        parts.append(f"task {task!r}")
    if split:
        parts.append(f"split {split!r}")
    return ", ".join(parts)
