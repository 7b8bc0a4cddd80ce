"""``sweep status DIR``: each run's state (done, running, failed, interrupted, submitted, pending) and times."""

from __future__ import annotations

import time
from pathlib import Path

from lit_star.sweeps.collect import load_index
from lit_star.sweeps.launch import effective_state, read_status


def run_states(sweep_dir: str | Path) -> list[dict]:
    rows = []
    now = time.time()
    for run in load_index(sweep_dir)["runs"]:
        status = read_status(run["run_dir"])
        state = effective_state(status)
        steps = status.get("steps", {})
        if state == "running":
            current = next((name for name, s in steps.items() if s.get("state") == "running"), "")
            wall = now - status.get("started_at", now)
        else:
            current = (status.get("failed_step") or "") if state in ("failed", "interrupted") else ""
            wall = status.get("wall_seconds") or sum(s.get("seconds", 0) for s in steps.values()) or None
        rows.append({"point": run["point"], "seed": run["seed"], "state": state, "step": current,
                     "wall_seconds": wall, "run_dir": run["run_dir"], "log": status.get("log") or "",
                     "error": status.get("error") or "", "job_id": status.get("job_id"),
                     "steps": {name: s.get("seconds") for name, s in steps.items()}})
    return rows


def format_status(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    width = max([len(r["point"]) for r in rows] + [5])
    state_width = max([len(r["state"]) + len(r["step"]) + 3 for r in rows] + [11])
    lines = [f"{'point':<{width}}  seed  {'state':<{state_width}}  {'wall':>8}  steps (s)"]
    for row in rows:
        wall = "-" if row["wall_seconds"] is None else f"{row['wall_seconds'] / 60:.1f} min"
        steps = ", ".join(f"{n} {s:.0f}" for n, s in row["steps"].items() if s is not None)
        state = row["state"] + (f" ({row['step']})" if row["step"] else "")
        lines.append(f"{row['point']:<{width}}  {row['seed']:>4}  {state:<{state_width}}  {wall:>8}  {steps}")
        if row["state"] == "failed":
            lines.append(f"{'':<{width}}        log: {row['log']}")
            first = (row["error"] or "").splitlines()[:1]
            if first:
                lines.append(f"{'':<{width}}        {first[0][:160]}")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" of {len(rows)} run(s)")
    return "\n".join(lines)
