"""JSON Lines reading with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every non-blank line; a line that is not a JSON object raises."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def read_jsonl(path: str | Path, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """All records of ``path``; ``check(record)`` returns a problem description or None. Empty files raise."""
    records = []
    for line_no, record in iter_jsonl(path):
        problem = check(record) if check else None
        if problem:
            raise ValueError(f"{path}:{line_no}: {problem}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records
