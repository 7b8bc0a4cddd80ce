"""Run a multi-stage curriculum (the Shapes world end to end) with resumable steps.

    python -m lit_star curriculum recipes/shapes/curriculum.yaml
    python -m lit_star curriculum recipes/shapes/curriculum.yaml recipes/shapes/curriculum_smoke.yaml --run-dir /tmp/cur

A curriculum YAML has a ``run_dir`` and an ordered mapping ``steps``. Each step is one
``python -m lit_star ...`` invocation (``argv`` + ``extra_args``) and the ``output`` it must leave.
A finished step is marked in ``<run_dir>/done/<step>`` and skipped next time, so rerunning the same
command resumes after the last finished step; a step that was interrupted is rerun, with
``resume_args`` appended when its ``resume_when`` path exists (``--ckpt_path last`` for training).
Several YAML files merge in order (OmegaConf) and ``${run_dir}``-style interpolations resolve
after merging. ``env`` entries are exported to every step (the Shapes recipes take their world and
run directories from ``SHAPES_WORLD`` / ``SHAPES_RUNS``). Each step runs in its own process so memory
and thread settings start fresh. Wall times go to ``<run_dir>/timings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_curriculum(paths: list[str], run_dir: str | None = None) -> DictConfig:
    configs = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"curriculum file not found: {path}")
        configs.append(OmegaConf.load(path))
    config = OmegaConf.merge(*configs)
    if run_dir is not None:
        config.run_dir = run_dir
    for key in ("run_dir", "steps"):
        if key not in config:
            raise KeyError(f"curriculum config lacks the top-level key {key!r} (files: {paths})")
    for name, step in config.steps.items():
        for key in ("argv", "output"):
            if key not in step:
                raise KeyError(f"curriculum step {name!r} lacks {key!r}")
    OmegaConf.resolve(config)
    return config


def run_curriculum(config: DictConfig, only: list[str] | None = None, log=print) -> dict[str, dict]:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "timings.json"
    timings: dict[str, dict] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(config.get("threads", os.cpu_count() or 1)))
    # The Shapes recipes read their world and run roots from ${oc.env:...}; one place sets them.
    env.update({str(k): str(v) for k, v in config.get("env", {}).items()})
    for name, step in config.steps.items():
        if only and name not in only:
            continue
        output, marker = Path(step.output), run_dir / "done" / name
        if marker.exists() and output.exists():
            log(f"[curriculum] {name}: done already ({output}), skipping")
            continue
        argv = [str(a) for a in [*step.argv, *step.get("extra_args", [])]]
        if step.get("resume_when") and Path(step.resume_when).exists():
            argv += [str(a) for a in step.get("resume_args", [])]
        log(f"[curriculum] {name}: python -m lit_star {' '.join(argv)}")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "lit_star", *argv], env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"curriculum step {name!r} failed with exit code {result.returncode} after {seconds:.0f} s")
        if not output.exists():
            raise RuntimeError(f"curriculum step {name!r} finished but did not write its output {output}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{seconds:.1f}\n")
        timings[name] = {"seconds": round(seconds, 1), "argv": argv}
        timings_path.write_text(json.dumps(timings, indent=2))
        log(f"[curriculum] {name}: finished in {seconds:.0f} s")
    return timings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_star curriculum", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="curriculum YAML files, merged in order")
    parser.add_argument("--run-dir", help="override the run_dir of the YAML")
    parser.add_argument("--only", nargs="*", help="run only these step names")
    args = parser.parse_args(argv)
    config = load_curriculum(args.configs, args.run_dir)
    timings = run_curriculum(config, args.only)
    report = write_report(config, timings)
    print(f"[curriculum] report: {report}")
    return 0


def _load_json(path: str | None) -> dict | None:
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return None


def _score_table(results: dict[str, dict]) -> list[str]:
    """One markdown table: categories as rows, one column per scored set."""
    names = list(results)
    categories = sorted({c for r in results.values() for c in r["categories"]})
    lines = ["| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for category in [*categories, "overall"]:
        cells = []
        for result in results.values():
            value = result["overall"] if category == "overall" else result["categories"].get(category)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def write_report(config: DictConfig, timings: dict[str, dict]) -> Path:
    """``<run_dir>/report.md``: wall time per step, understanding before/after, ShapesEval, grids."""
    run_dir = Path(config.run_dir)
    sources = config.get("report", {})
    lines = ["# Shapes curriculum report", "", f"Run directory: `{run_dir}`", "", "## Wall time per step", "",
             "| step | seconds |", "|---|---|"]
    for name, timing in timings.items():
        lines.append(f"| {name} | {timing['seconds']:.0f} |")
    lines.append(f"| **total** | {sum(t['seconds'] for t in timings.values()):.0f} |")

    before, after = _load_json(sources.get("understanding_before")), _load_json(sources.get("understanding_after"))
    if before and after:
        identical = before["answers"] == after["answers"]
        lines += ["", "## Understanding before and after stage 2", "",
                  "| | VQA accuracy | riddle accuracy |", "|---|---|---|",
                  f"| stage 0 base | {before['vqa_accuracy']:.4f} | {before['riddle_accuracy']:.4f} |",
                  f"| base inside stage 2 | {after['vqa_accuracy']:.4f} | {after['riddle_accuracy']:.4f} |", "",
                  f"Every answer identical: **{identical}** ({len(after['answers'])} answers compared)."]

    shapes = _load_json(sources.get("shapes_eval"))
    if shapes:
        lines += ["", "## ShapesEval", "", f"Sampler: `{json.dumps(shapes['sampler'])}`", ""]
        sets = {"GenEval-style": shapes["geneval"]}
        if "geneval_seen_combinations" in shapes:
            sets["seen pairs (control)"] = shapes["geneval_seen_combinations"]
        if "knowledge_without_reasoning" in shapes:
            sets["riddles, no reasoning"] = shapes["knowledge_without_reasoning"]
            sets["riddles, reasoning"] = shapes["knowledge_with_reasoning"]
        if "edit" in shapes:
            sets["edits"] = shapes["edit"]
        lines += _score_table(sets)
        if "riddle_answer_accuracy" in shapes:
            lines += ["", f"The base answered {shapes['riddle_answer_accuracy']:.3f} of the riddles with the right caption."]
        lines += ["", "## Sample grids", ""]
        for grid in shapes.get("grids", []):
            relative = os.path.relpath(grid, run_dir)
            lines.append(f"**{Path(grid).stem}**  \n![{Path(grid).stem}]({relative})\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
