"""Benchmark jobs behind ``python -m lit_star bench``; see :mod:`lit_star.commands.bench`."""

from __future__ import annotations

import json
import sys


def finish(results: dict, json_path: str | None, ok: bool, failure: str) -> int:
    """Write ``results`` to ``json_path`` (if given); the exit status, after printing ``failure`` if not ``ok``."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    if not ok:
        print(failure, file=sys.stderr)
        return 1
    return 0
