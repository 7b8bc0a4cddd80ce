"""Second-level dispatch for job groups such as ``bench quantize`` or ``data shapes``."""

from __future__ import annotations

import importlib
import sys


def dispatch(group: str, table: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Run ``table[argv[0]]`` (a ``"module:function"`` taking ``argv[1:]``)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m lit_star {group} <name> [options]\n\n{group} jobs:")
        for name, (text, _) in table.items():
            print(f"  {name:<16}{text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"lit_star {group}: unknown job {name!r}; choose from {sorted(table)}", file=sys.stderr)
        return 2
    module_name, func_name = table[name][1].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)
