"""A CPU thread budget that a scheduler can change while a run is going.

The curriculum (``python -m lit_star curriculum ...``) starts each step with ``OMP_NUM_THREADS`` set to
the threads the step asked for. When a step that ran beside it ends and nothing else is ready to use
the freed cores, the scheduler writes a larger count into the file named by ``LIT_STAR_THREADS_FILE``;
a training run follows it through :class:`lit_star.training.ThreadBudget` (``torch.set_num_threads``),
and shrinks back when the scheduler takes the threads away for a new step. A step that must stay
bit-identical from run to run names, in ``LIT_STAR_GROW_AT_STEP``, the training step at which it takes
the granted threads (waiting there for them); before it, and after, its count does not change. This
module has no heavy imports, so the scheduler can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

THREADS_FILE_ENV = "LIT_STAR_THREADS_FILE"
GROW_AT_STEP_ENV = "LIT_STAR_GROW_AT_STEP"


def write_thread_budget(path: str | Path, threads: int) -> None:
    """Atomically replace the budget in ``path`` (a reader never sees a half-written number)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{int(threads)}\n")
    os.replace(tmp, path)


def read_thread_budget(path: str | Path) -> int | None:
    """The budget in ``path``, or None when the file is missing or does not hold a positive integer."""
    try:
        value = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 1 else None
