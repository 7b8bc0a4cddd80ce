"""The whole curriculum, end to end, on a tiny world: every stage hands the next what it needs."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lit_star.commands.curriculum import (
    _grant_spare_threads,
    _Running,
    busy_seconds,
    critical_path,
    load_curriculum,
    preflight,
    remaining_estimate,
    run_curriculum,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = [str(REPO / "recipes/shapes/curriculum.yaml"), str(REPO / "recipes/shapes/curriculum_smoke.yaml")]


def test_curriculum_config_resolves_and_names_missing_keys(tmp_path):
    config = load_curriculum(RECIPES, run_dir=str(tmp_path))
    assert list(config.steps) == ["world", "stage0_base", "stage1_vq", "tokenize", "understanding_before",
                                  "stage2_stacked_ar", "stage3_diffusion_decoder", "shapes_eval_seen",
                                  "shapes_eval_held_out", "understanding_after", "vq_eval", "binding", "stage4_unified",
                                  "shapes_eval_stage4", "edit_eval_stage4", "understanding_after_stage4"]
    assert config.env.SHAPES_WORLD == f"{tmp_path}/world"
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_dir: x\nsteps:\n  world:\n    argv: [data, shapes]\n")
    with pytest.raises(KeyError, match="step 'world' lacks 'output'"):
        load_curriculum([str(broken)])


def test_main_curriculum_changes_a_training_step_threads_only_at_a_fixed_step():
    # A step that grows mid-run changes its float sums at a wall-clock step, so two runs of the README's
    # main job would train different VQs and report different scores (docs/curriculum.md, "Why two runs of the same recipes disagreed").
    config = load_curriculum([RECIPES[0]])
    assert not [name for name, step in config.steps.items() if step.get("grow", False)]
    assert {name: step.grow_at_step for name, step in config.steps.items() if "grow_at_step" in step} == {
        "stage1_vq": 625}


# Stands in for `python -m lit_star ...`: waits, watching its thread budget file, then records when it
# ran, with how many threads, and every budget the scheduler granted it meanwhile.
FAKE_STEP = """
import json, os, sys, time
seconds, output = float(sys.argv[1]), sys.argv[2]
start = time.time()
print("fake step started", sys.stdout.isatty(), flush=True)
budgets = set()
while time.time() - start < abs(seconds):
    budgets.add(open(os.environ["LIT_STAR_THREADS_FILE"]).read().strip())
    time.sleep(0.02)
print("fake step ran", flush=True)
if seconds < 0:
    sys.exit(3)
open(output, "w").write(json.dumps({"start": start, "end": time.time(), "threads": os.environ["OMP_NUM_THREADS"],
                                    "budgets": sorted(budgets), "grow_at_step": os.environ.get("LIT_STAR_GROW_AT_STEP")}))
"""


def _fake_curriculum(tmp_path, b_seconds: float = 1.0, c_seconds: float = 1.0, c_grows: dict | None = None):
    (tmp_path / "fake_step.py").write_text(FAKE_STEP)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    steps = {
        "a": dict(argv=["0.1", f"{out}/a"], output=f"{out}/a"),
        "b": dict(after=["a"], threads=1, argv=[str(b_seconds), f"{out}/b"], output=f"{out}/b"),
        "c": dict(after=["a"], threads=1, **(c_grows or {"grow": True}), argv=[str(c_seconds), f"{out}/c"],
                  output=f"{out}/c"),
        "d": dict(argv=["0.1", f"{out}/d"], output=f"{out}/d"),  # no `after`: waits for c, the step before it
    }
    config = OmegaConf.create({"run_dir": str(tmp_path / "run"), "threads": 2, "steps": steps})
    path = tmp_path / "fake.yaml"
    OmegaConf.save(config, path)
    return load_curriculum([str(path)]), (sys.executable, str(tmp_path / "fake_step.py")), out


def test_independent_steps_share_the_cores_and_dependents_wait(tmp_path):
    config, command, out = _fake_curriculum(tmp_path)
    lines = []
    timings = run_curriculum(config, log=lines.append, command=command, status_every=0.3)
    ran = {name: json.loads((out / name).read_text()) for name in "abcd"}
    assert ran["b"]["start"] < ran["c"]["end"] and ran["c"]["start"] < ran["b"]["end"], "b and c did not overlap"
    assert ran["b"]["start"] >= ran["a"]["end"] and ran["c"]["start"] >= ran["a"]["end"]
    assert ran["d"]["start"] >= ran["c"]["end"]
    assert {name: ran[name]["threads"] for name in "abcd"} == {"a": "2", "b": "1", "c": "1", "d": "2"}
    # Steps see a terminal (live progress bars); side-by-side steps report their latest line.
    assert "fake step started True" in (tmp_path / "run/logs/b.log").read_text()
    assert any(l.startswith("[curriculum] running: b ") and "fake step started True" in l for l in lines), lines
    assert busy_seconds(timings) < sum(t["seconds"] for t in timings.values()) - 0.5


def test_critical_path_follows_each_step_back_to_the_one_whose_end_let_it_start():
    # The fifteenth run's shape: stage 0 beside stage 1, the eval tail in two processes.
    def span(start, seconds):
        return {"started_at": start, "seconds": seconds}

    timings = {"world": span(0, 32), "stage0": span(32.2, 1105), "before": span(1137.3, 14),
               "stage1": span(32.3, 1374), "tokenize": span(1406.5, 48), "stage2": span(1454.6, 1341),
               "riddles": span(2795.8, 130), "geneval": span(2795.9, 168), "after": span(2926, 16),
               "binding": span(2964.1, 35)}
    assert critical_path(timings) == ["world", "stage1", "tokenize", "stage2", "geneval", "binding"]
    timings["binding"] = span(2942.2, 35)  # started as `after` ended: the path goes through it instead
    assert critical_path(timings) == ["world", "stage1", "tokenize", "stage2", "riddles", "after", "binding"]
    assert critical_path({"a": {"seconds": 3.0}}) == []  # timed before start times were recorded


def test_a_growing_step_takes_the_threads_its_finished_neighbour_freed(tmp_path):
    config, command, out = _fake_curriculum(tmp_path, b_seconds=0.3, c_seconds=1.5)
    lines = []
    timings = run_curriculum(config, log=lines.append, command=command)
    ran = {name: json.loads((out / name).read_text()) for name in "abcd"}
    assert ran["c"]["threads"] == "1" and ran["c"]["budgets"] == ["1", "2"]
    assert ran["b"]["budgets"] == ["1"] and ran["d"]["budgets"] == ["2"]
    assert "[curriculum] c: now 2 thread(s)" in lines
    assert timings["c"]["grew_to"] == 2 and "grew_to" not in timings["b"]
    report = write_report(config, timings).read_text()
    assert "| c | 2 | 1, 2 once spare |" in report
    assert "Critical path" in report and f"a {timings['a']['seconds']:.0f} s → c " in report


def test_spare_threads_go_back_when_a_new_step_starts(tmp_path):
    steps = {name: {"argv": [], "output": "x", "threads": 1, "grow": name == "grower"} for name in ("grower", "other")}
    config = OmegaConf.create({"steps": steps})

    def running_step(name):
        return _Running(None, 1, 0.0, tmp_path / f"{name}.log", False, None, tmp_path / name, 1, 1)

    running = {"grower": running_step("grower")}
    _grant_spare_threads(config, running, total_threads=3, log=lambda *_: None)
    assert (tmp_path / "grower").read_text() == "3\n"
    running["other"] = running_step("other")
    _grant_spare_threads(config, running, total_threads=3, log=lambda *_: None)
    assert (tmp_path / "grower").read_text() == "2\n" and running["grower"].most_granted == 3
    assert not (tmp_path / "other").exists(), "a step that does not grow keeps the budget it started with"


def test_a_step_that_grows_at_a_fixed_step_is_told_the_step_and_keeps_what_it_was_granted(tmp_path):
    config, command, out = _fake_curriculum(tmp_path, b_seconds=0.3, c_seconds=1.5, c_grows={"grow_at_step": 7})
    timings = run_curriculum(config, log=lambda *_: None, command=command)
    ran = {name: json.loads((out / name).read_text()) for name in "abcd"}
    assert ran["c"]["grow_at_step"] == "7" and ran["b"]["grow_at_step"] is None
    assert ran["c"]["budgets"] == ["1", "2"] and timings["c"]["grew_at_step"] == 7
    assert "| c | 2 | 1, 2 from training step 7 |" in write_report(config, timings).read_text()

    steps = {name: {"argv": [], "output": "x", "threads": 1, **({"grow_at_step": 7} if name == "grower" else {})}
             for name in ("grower", "other")}
    running = {"grower": _Running(None, 1, 0.0, tmp_path / "g.log", False, None, tmp_path / "grower", 1, 1,
                                  keeps_grant=True)}
    _grant_spare_threads(OmegaConf.create({"steps": steps}), running, total_threads=3, log=lambda *_: None)
    assert (tmp_path / "grower").read_text() == "3\n" and running["grower"].held == 3
    running["other"] = _Running(None, 1, 0.0, tmp_path / "o.log", False, None, tmp_path / "other", 1, 1)
    _grant_spare_threads(OmegaConf.create({"steps": steps}), running, total_threads=3, log=lambda *_: None)
    assert (tmp_path / "grower").read_text() == "3\n", "a grant taken back would change the step's float sums"


def test_grow_at_step_is_checked_before_anything_runs(tmp_path):
    def load(step):
        path = tmp_path / "c.yaml"
        OmegaConf.save(OmegaConf.create({"run_dir": str(tmp_path), "threads": 2,
                                         "steps": {"a": {"argv": [], "output": "x", **step}}}), path)
        return load_curriculum([str(path)])

    assert load({"threads": 1, "grow_at_step": 0}).steps.a.grow_at_step == 0
    with pytest.raises(ValueError, match="'a': set grow or grow_at_step, not both"):
        load({"threads": 1, "grow": True, "grow_at_step": 5})
    with pytest.raises(ValueError, match="'a': grow_at_step must be a training step"):
        load({"threads": 1, "grow_at_step": "soon"})


def test_a_step_with_every_thread_ignores_grow_at_step_instead_of_waiting_forever(tmp_path):
    # The main recipe on a 1-thread override: stage 1 has nothing to grow into.
    config, command, out = _fake_curriculum(tmp_path, c_grows={"grow_at_step": 3})
    config.threads = 1
    lines = []
    timings = run_curriculum(config, log=lines.append, command=command)
    assert json.loads((out / "c").read_text())["grow_at_step"] is None and "grew_at_step" not in timings["c"]
    assert "[curriculum] c: grow_at_step 3 ignored, the step has all 1 thread(s)" in lines


def test_a_failed_step_lets_running_steps_finish_and_starts_nothing_after(tmp_path):
    config, command, out = _fake_curriculum(tmp_path, b_seconds=-0.5)
    with pytest.raises(RuntimeError, match=r"(?s)'b' \(exit code 3.*fake step ran"):
        run_curriculum(config, log=lambda *_: None, command=command)
    assert (out / "c").exists() and not (out / "d").exists()
    assert sorted(p.name for p in (tmp_path / "run/done").iterdir()) == ["a", "c"]


def test_step_dependencies_and_threads_are_checked_before_anything_runs(tmp_path):
    base = {"run_dir": str(tmp_path), "threads": 2}
    later = {**base, "steps": {"a": {"after": ["b"], "argv": [], "output": "x"}, "b": {"argv": [], "output": "y"}}}
    OmegaConf.save(OmegaConf.create(later), tmp_path / "later.yaml")
    with pytest.raises(KeyError, match="'a' runs after 'b', which comes later"):
        load_curriculum([str(tmp_path / "later.yaml")])
    greedy = {**base, "steps": {"a": {"threads": 4, "argv": [], "output": "x"}}}
    OmegaConf.save(OmegaConf.create(greedy), tmp_path / "greedy.yaml")
    with pytest.raises(ValueError, match="'a' asks for 4 threads; the curriculum has threads: 2"):
        load_curriculum([str(tmp_path / "greedy.yaml")])


def test_report_merges_split_shapes_results_and_refuses_mixed_samplers(tmp_path):
    def part(name, sampler, sets):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"sampler": sampler, "grids": [f"{name}.png"], **sets}))
        return str(path)

    table = {"overall": 0.5, "categories": {"colors": 0.5}}
    first = part("first", {"cfg_scale": 6.0}, {"geneval": table})
    second = part("second", {"cfg_scale": 6.0}, {"geneval_seen_combinations": table})
    config = OmegaConf.create({"run_dir": str(tmp_path), "report": {"shapes_eval": [first, second]}})
    report = write_report(config, {}).read_text()
    assert "| held-out pairs | seen pairs (control) |" in report and "![first]" in report and "![second]" in report
    assert "| overall, standard error | - | - |" in report  # results written before the error was recorded
    counted = {"overall": 0.25, "overall_standard_error": 0.0354, "categories": {"colors": 0.5, "counting": 0.0}}
    config.report.shapes_eval = part("counted", {"cfg_scale": 6.0}, {"geneval": counted})
    assert "| overall, standard error | 0.035 |" in write_report(config, {}).read_text()
    mixed = part("mixed", {"cfg_scale": 3.0}, {"geneval_seen_combinations": table})
    config.report.shapes_eval = [first, mixed]
    with pytest.raises(ValueError, match="mixed.json was sampled with"):
        write_report(config, {})


def test_report_puts_seen_and_held_out_side_by_side_with_objects_and_the_wrong_shape_baseline(tmp_path):
    def result(score, objects, baseline):
        return {"overall": score, "overall_standard_error": 0.02, "categories": {"colors": score, "counting": score},
                "objects_per_image": {"colors": objects, "counting": objects}, "wrong_shape_baseline": {"colors": baseline}}

    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"sampler": {"cfg_scale": 4.0}, "geneval": result(0.1, 3.5, 0.28),
                                "geneval_seen": result(0.6, 1.2, 0.05), "reasoning_suffix": ""}))
    config = OmegaConf.create({"run_dir": str(tmp_path), "report": {"shapes_eval": str(path)}})
    report = write_report(config, {}).read_text()
    assert "**seen 0.600 ± 0.020, held-out 0.100 ± 0.020** (ShapesEval on seen and on held-out" in report
    assert "| held-out pairs | seen pairs |" in report
    assert ("| category | held-out pairs: score | objects per image | wrong-shape baseline | seen pairs: score | "
            "objects per image | wrong-shape baseline |") in report
    assert "| colors | 0.100 | 3.50 | 0.280 | 0.600 | 1.20 | 0.050 |" in report
    assert "| counting | 0.100 | 3.50 | - | 0.600 | 1.20 | - |" in report
    assert 'Reasoning mode appended "" to the base\'s answers.' in report


def test_report_tables_prompt_binding_by_grid_row(tmp_path):
    path = tmp_path / "binding.json"
    path.write_text(json.dumps({
        "images": 5, "chance": {"colour": 0.1, "shape": 0.2},
        "colour": 0.6, "colour_by_grid_row": {"0": {"accuracy": 1.0, "images": 2}, "2": {"accuracy": 1 / 3, "images": 3}},
        "shape": 0.4, "shape_by_grid_row": {"0": {"accuracy": 0.5, "images": 2}, "2": {"accuracy": 1 / 3, "images": 3}},
    }))
    report = write_report(OmegaConf.create({"run_dir": str(tmp_path), "report": {"binding": str(path)}}), {}).read_text()
    assert "(5 one-object validation images)" in report
    assert "| attribute | chance | all | grid row 0 | grid row 2 |" in report
    assert "| colour | 0.10 | 0.600 | 1.00 (2) | 0.33 (3) |" in report
    assert "| shape | 0.20 | 0.400 | 0.50 (2) | 0.33 (3) |" in report


def test_report_opens_with_the_claims_table_and_reports_the_vq_and_stage2_loss(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    answers = ["yes", "red"]
    for name in ("before", "after"):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "answers": answers, "vqa_accuracy": 0.9, "riddle_accuracy": 0.5, "vqa_accuracy_by_type": {"count": 0.9}}))
    scores = {"overall": 0.5, "overall_standard_error": 0.05, "categories": {"single_object": 0.9, "colors": 0.1}}
    grid = tmp_path / "grids" / "geneval_seen_colors.png"
    grid.parent.mkdir()
    grid.with_suffix(".prompts.txt").write_text("a red star\na blue circle\n")
    (tmp_path / "shapes.json").write_text(json.dumps({
        "sampler": {}, "grids": [str(grid)], "geneval_seen": scores, "geneval": {**scores, "overall": 0.2},
        "knowledge_seen_with_reasoning": {"overall": 0.6, "categories": {}},
        "knowledge_seen_without_reasoning": {"overall": 0.15, "categories": {}}}))
    (tmp_path / "vq.json").write_text(json.dumps({
        "target": 0.98, "lowest_category": 0.36, "meets_target": False, "psnr": 30.5, "utilisation": 0.5,
        "perplexity": 300.0, "sets": {"geneval": {"overall": 0.4, "categories": {"colors": 0.36, "counting": 0.44}}}}))
    writer = SummaryWriter(str(tmp_path / "stage2" / "tensorboard"))
    for step, (loss, unconditional) in enumerate([(3.0, 3.5), (2.0, 2.75)]):
        writer.add_scalar("val/loss", loss, step)
        writer.add_scalar("val/loss_unconditional", unconditional, step)
        writer.add_scalar("val/prompt_gain", unconditional - loss, step)
    writer.close()
    report = {"understanding_before": str(tmp_path / "before.json"), "understanding_after": str(tmp_path / "after.json"),
              "shapes_eval": str(tmp_path / "shapes.json"), "vq": str(tmp_path / "vq.json"),
              "stage2_run": str(tmp_path / "stage2")}
    text = write_report(OmegaConf.create({"run_dir": str(tmp_path), "report": report}), {}).read_text()
    claims = text.index("## What STAR claims, what this run measured")
    assert claims < text.index("## Wall time per step")
    assert "every answer identical after stage 2: **True** (2 answers; VQA 0.900 → 0.900)" in text
    assert "seen pairs overall 0.500 ± 0.050; single object 0.900" in text
    assert "held-out pairs overall 0.200 ± 0.050" in text
    assert "seen-pair riddles 0.600 with reasoning, 0.150 without (4.0x)" in text
    assert "lowest **0.360**, target not met" in text and "PSNR 30.50 dB" in text
    assert "| colors | 0.360 |" in text
    assert "| 2.0000 | 2.7500 | 0.7500 |" in text  # the last validation, not the first
    assert "![geneval_seen_colors](grids/geneval_seen_colors.png)" in text
    assert "Tiles row by row, 8 per row: 1 a red star; 2 a blue circle" in text
    (tmp_path / "empty").mkdir()
    missing = write_report(OmegaConf.create({"run_dir": str(tmp_path / "empty"), "report": {}}), {}).read_text()
    assert missing.count("not measured") == 4 and "## VQ" not in missing and "## Stage 2 validation loss" not in missing


def _fit_curriculum(tmp_path, stage_yaml: str, extra_args=()) -> "OmegaConf":
    (tmp_path / "stage.yaml").write_text(stage_yaml)
    steps = {"train": {"argv": ["fit", "--config", str(tmp_path / "stage.yaml")], "extra_args": list(extra_args),
                       "output": str(tmp_path / "out")}}
    return OmegaConf.create({"run_dir": str(tmp_path / "run"), "threads": 1, "steps": steps})


def _no_compiler(option):
    raise RuntimeError(f"{option} needs a C++ compiler for torch.compile (TorchInductor), and none was found")


def test_preflight_names_a_missing_compiler_only_for_a_step_that_compiles(tmp_path):
    compiled = _fit_curriculum(tmp_path, "model:\n  init_args:\n    compile_layers: true\n")
    with pytest.raises(RuntimeError, match="step 'train': model.init_args.compile_layers needs a C\\+\\+ compiler"):
        preflight(compiled, ["train"], require_compile_toolchain=_no_compiler)
    preflight(compiled, [], require_compile_toolchain=_no_compiler)  # done already: nothing to compile
    overridden = _fit_curriculum(tmp_path, "model:\n  init_args:\n    compile_layers: true\n",
                                 ["--model.init_args.compile_layers", "false"])
    preflight(overridden, ["train"], require_compile_toolchain=_no_compiler)


def test_preflight_finds_the_compiling_step_of_the_main_curriculum(tmp_path):
    asked = []
    preflight(load_curriculum([RECIPES[0]], run_dir=str(tmp_path)), list(load_curriculum([RECIPES[0]]).steps),
              require_compile_toolchain=asked.append)
    assert asked == ["step 'stage2_stacked_ar': model.init_args.compile_layers",
                     "step 'stage4_unified': model.init_args.stacked_ar.init_args.compile_layers"]


def test_the_gpu_variant_swaps_the_trainer_of_every_fit_step_and_preflight_asks_for_a_gpu(tmp_path):
    gpu = load_curriculum([RECIPES[0], str(REPO / "recipes/shapes/curriculum_gpu.yaml")], run_dir=str(tmp_path))
    cpu = load_curriculum([RECIPES[0]], run_dir=str(tmp_path))
    fit_steps = [name for name, step in cpu.steps.items() if "argv" in step]
    assert fit_steps == ["stage0_base", "stage1_vq", "stage2_stacked_ar", "stage3_diffusion_decoder", "stage4_unified"]
    for name in fit_steps:
        assert list(gpu.steps[name].argv) == [a.replace("cpu.yaml", "gpu.yaml") for a in cpu.steps[name].argv]
    assert gpu.steps.world.config.world.t2i_train == 4 * 6000 and gpu.steps.world.config.out == f"{tmp_path}/world"
    assert gpu.steps.stage1_vq.extra_args[:2] == ["--trainer.max_steps", "3400"]
    assert gpu.steps.stage2_stacked_ar.extra_args[:2] == ["--trainer.max_steps", "5600"]
    assert gpu.get("expected_seconds") is None and gpu.steps.stage1_vq.get("grow_at_step") is None
    compilers = []
    with pytest.raises(RuntimeError, match="step 'stage0_base': trainer.accelerator is 'gpu' but torch sees no "
                                           "CUDA device; .*trainer_recipe: recipes/trainer/cpu.yaml"):
        preflight(gpu, fit_steps, require_compile_toolchain=compilers.append, gpu_available=lambda: False)
    preflight(gpu, fit_steps, require_compile_toolchain=compilers.append, gpu_available=lambda: True)
    preflight(cpu, fit_steps, require_compile_toolchain=compilers.append, gpu_available=lambda: False)


def test_preflight_names_a_missing_or_broken_config_file(tmp_path):
    config = _fit_curriculum(tmp_path, "model: [unclosed\n")
    with pytest.raises(RuntimeError, match="step 'train': config file .*stage.yaml does not parse"):
        preflight(config, ["train"])
    config.steps.train.argv = ["fit", "--config", str(tmp_path / "missing.yaml")]
    with pytest.raises(RuntimeError, match="step 'train': config file .*missing.yaml does not exist"):
        preflight(config, ["train"])


def test_preflight_names_a_full_disk_and_an_unwritable_run_dir(tmp_path):
    config = _fit_curriculum(tmp_path, "trainer: {}\n")
    full = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**8, 10**8)  # 0.1 GB free
    with pytest.raises(RuntimeError, match=r"only 0.1 GB free under .*run, the run needs 2 GB; .*--run_dir"):
        preflight(config, ["train"], disk_usage=full)
    config.min_free_gb = 0.05
    preflight(config, ["train"], disk_usage=full)
    (tmp_path / "a_file").write_text("")
    config.run_dir = str(tmp_path / "a_file" / "run")
    with pytest.raises(RuntimeError, match="run directory .*a_file/run is not writable"):
        preflight(config, ["train"])


def test_a_failed_preflight_stops_the_run_before_any_step(tmp_path):
    config, command, out = _fake_curriculum(tmp_path)
    config.min_free_gb = 10**9  # more than any disk has
    started = time.time()
    with pytest.raises(RuntimeError, match="curriculum preflight failed, nothing was run"):
        run_curriculum(config, log=lambda *_: None, command=command)
    assert time.time() - started < 1.0 and not any(out.iterdir())
