"""The four-stage smoke curriculum end to end: every stage hands the next what it needs; a rerun resumes (~4 min)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_star.commands.curriculum import load_curriculum

REPO = Path(__file__).resolve().parents[2]
RECIPES = [str(REPO / "recipes/shapes/curriculum.yaml"), str(REPO / "recipes/shapes/curriculum_smoke.yaml")]


@pytest.mark.slow
def test_smoke_curriculum_runs_end_to_end_and_resumes(smoke_curriculum):
    run, _ = smoke_curriculum  # run once per session (conftest), shared with the notebook and sweep tests
    command = [sys.executable, "-m", "lit_star", "curriculum", RECIPES[0], "--overlays", f"[{RECIPES[1]}]",
               "--run_dir", str(run)]

    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == set(load_curriculum(RECIPES, str(run)).steps)
    # The smoke recipe moves stage 1's growth to step 1: it waits there for stage 0's core, then takes it.
    assert timings["stage1_vq"]["grew_at_step"] == 1 and timings["stage1_vq"]["grew_to"] == 2
    assert "[threads] step 1: 2 thread(s) after" in (run / "logs/stage1_vq.log").read_text()
    before = json.loads((run / "eval/understanding_before.json").read_text())
    after = json.loads((run / "eval/understanding_after.json").read_text())
    assert before["answers"] and before["answers"] == after["answers"], "stage 2 changed the base's answers"
    held_out = json.loads((run / "eval/shapes_held_out/results.json").read_text())
    assert set(held_out["geneval"]["categories"]) == {"single_object", "two_objects", "counting", "colors",
                                                      "position", "color_attr"}
    assert {"knowledge_without_reasoning", "knowledge_with_reasoning"} <= set(held_out)
    seen = json.loads((run / "eval/shapes_seen/results.json").read_text())
    assert {"geneval_seen", "knowledge_seen_without_reasoning", "knowledge_seen_with_reasoning"} <= set(seen)
    assert "geneval" not in seen and "geneval_seen" not in held_out, "the two processes split the sets"
    assert "knowledge_without_reasoning" not in seen and "knowledge_seen_with_reasoning" not in held_out
    assert seen["reasoning_suffix"] == "" == held_out["reasoning_suffix"], "the Shapes recipe records no suffix"
    vq = json.loads((run / "eval/vq/vq_results.json").read_text())
    assert set(vq["sets"]) == {"geneval", "geneval_seen", "knowledge", "edit"} and vq["psnr"] > 0
    report = (run / "report.md").read_text()
    assert "Every answer identical: **True**" in report and "| stage2_stacked_ar |" in report
    assert report.index("## What STAR claims") < report.index("## Wall time per step")
    assert "## VQ (stage 1)" in report and "## Stage 2 validation loss" in report
    assert "Tiles row by row, 8 per row: 1 " in report
    assert f"Scene descriptions ({before['descriptions']['descriptions']}), per object in reading order" in report
    assert ("| held-out pairs | seen pairs | riddles, no reasoning | riddles, reasoning "
            "| seen-pair riddles, no reasoning | seen-pair riddles, reasoning |") in report
    assert "(ShapesEval on seen and on held-out colour/shape pairs, ± one standard error)" in report
    assert "held-out pairs: score | objects per image | wrong-shape baseline" in report
    assert "of the seen-pair riddles with the right caption" in report
    binding = json.loads((run / "eval/binding.json").read_text())
    assert binding["images"] >= 1 and f"| colour | 0.10 | {binding['colour']:.3f} |" in report
    assert all(Path(grid).is_file() for grid in held_out["grids"] + seen["grids"])
    assert all(f"![{Path(grid).stem}]" in report for grid in held_out["grids"] + seen["grids"])

    # Stages 3 and 4: the stage 4 stack's samples decoded by both decoders, the edit set, understanding after.
    stage4 = json.loads((run / "eval/stage4_seen/results.json").read_text())
    assert {"geneval_seen", "geneval_seen_diffusion"} <= set(stage4) and "edit" not in stage4
    ids = {p.name for p in (run / "eval/stage4_seen/geneval_seen").glob("*.png")}
    assert ids and ids == {p.name for p in (run / "eval/stage4_seen/geneval_seen_diffusion").glob("*.png")}
    edits = json.loads((run / "eval/stage4_edit/results.json").read_text())
    assert set(edits["edit"]["categories"]) and "geneval_seen" not in edits
    after4 = json.loads((run / "eval/understanding_after_stage4.json").read_text())
    assert after4["answers"] == before["answers"], "stage 4 changed the base's answers"
    assert "## Stage 4: stack and diffusion decoder tuned together" in report and "after stage 4: **True**" in report
    assert "| stage 2 stack, VQ decoder | stage 4 stack, VQ decoder | stage 4 stack, diffusion decoder |" in report
    assert "| edits after stage 4 |" in report and "| stage4_unified |" in report

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
