"""The whole curriculum, end to end, on a tiny world: every stage hands the next what it needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_star.commands.curriculum import load_curriculum

REPO = Path(__file__).resolve().parents[1]
RECIPES = [str(REPO / "recipes/shapes/curriculum.yaml"), str(REPO / "recipes/shapes/curriculum_smoke.yaml")]


def test_curriculum_config_resolves_and_names_missing_keys(tmp_path):
    config = load_curriculum(RECIPES, run_dir=str(tmp_path))
    assert list(config.steps) == ["world", "stage0_base", "stage1_vq", "tokenize", "understanding_before",
                                  "stage2_stacked_ar", "understanding_after", "shapes_eval"]
    assert config.env.SHAPES_WORLD == f"{tmp_path}/world"
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_dir: x\nsteps:\n  world:\n    argv: [data, shapes]\n")
    with pytest.raises(KeyError, match="step 'world' lacks 'output'"):
        load_curriculum([str(broken)])


@pytest.mark.slow
def test_smoke_curriculum_runs_end_to_end_and_resumes(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "lit_star", "curriculum", *RECIPES, "--run-dir", str(run)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == set(load_curriculum(RECIPES, str(run)).steps)
    before = json.loads((run / "eval/understanding_before.json").read_text())
    after = json.loads((run / "eval/understanding_after.json").read_text())
    assert before["answers"] and before["answers"] == after["answers"], "stage 2 changed the base's answers"
    results = json.loads((run / "eval/shapes/results.json").read_text())
    assert set(results["geneval"]["categories"]) == {"single_object", "two_objects", "counting", "colors",
                                                     "position", "color_attr"}
    assert {"knowledge_without_reasoning", "knowledge_with_reasoning", "geneval_seen_combinations"} <= set(results)
    report = (run / "report.md").read_text()
    assert "Every answer identical: **True**" in report and "| stage2_stacked_ar |" in report
    assert "seen pairs (control)" in report
    assert all(Path(grid).is_file() for grid in results["grids"])

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done already") == len(timings), "a finished step ran again"

    # The notebook explores exactly such a run directory: every code cell must run against it.
    notebook = json.loads((REPO / "notebooks/explore_shapes_curriculum.ipynb").read_text())
    source = "\n\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    env = {**os.environ, "LIT_STAR_RUN": str(run), "OMP_NUM_THREADS": "1"}
    cells = subprocess.run([sys.executable, "-c", source], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert cells.returncode == 0, cells.stderr[-3000:]
    assert "PSNR" in cells.stdout and "overall" in cells.stdout and "base:" in cells.stdout
