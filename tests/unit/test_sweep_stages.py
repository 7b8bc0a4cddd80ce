"""Sweep points with stages: earlier fits of a point (a curriculum's stages) expanded, checked, run in order before
the point's fit, resumed and refused when changed."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_star.cli import main as cli
from lit_star.sweeps.launch import RunJob, describe, read_status, run_finished
from lit_star.sweeps.prepare import prepare
from lit_star.sweeps.spec import SweepError, expand_runs, load_sweep
from tests.unit.test_sweeps import DEMO_MODEL, FAKE_LIT_STAR, _argv_value, _write

BORING_DATA = "lightning.pytorch.demos.boring_classes.BoringDataModule"


def _staged_sweep(tmp_path: Path, recipe: str, **changes) -> str:
    """Two points: ``staged`` trains ``first`` and ``second`` before its own fit, which starts from ``first``'s
    checkpoint; ``single`` is one fit."""
    content = {
        "configs": [recipe], "seeds": [0, 1],
        "overrides": {"trainer.max_steps": 5},
        "points": [
            {"name": "staged",
             "stages": [{"name": "first", "configs": [recipe], "overrides": {"trainer.max_steps": 2}},
                        {"name": "second", "configs": [recipe, recipe]}],
             "overrides": {"ckpt_from": "${run_dir}/first/checkpoints/last.ckpt"}},
            {"name": "single", "overrides": {"trainer.max_steps": 9}},
        ],
        "evals": [{"name": "score", "argv": ["score", "--score", "${seed}", "--out", "${run_dir}/eval/score.json"],
                   "output": "${run_dir}/eval/score.json"}],
        "metrics": {"score": {"json": "eval/score.json", "key": "overall.score"}},
        "baseline": "staged",
    }
    content.update(changes)
    return _write(tmp_path / "staged.yaml", {k: v for k, v in content.items() if v is not None})


def test_stages_expand_to_their_own_fits_in_the_run_directory(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {})
    staged, single = [r for r in expand_runs(load_sweep(_staged_sweep(tmp_path, recipe)), tmp_path / "out")
                      if r.seed == 1]
    assert [s["name"] for s in staged.stages] == ["first", "second"] and single.stages == []
    first, second = staged.stages
    assert first["run_dir"] == f"{staged.run_dir}/first"
    assert first["fit_argv"] == ["fit", "--config", recipe, "--trainer.max_steps", "2", "--seed_everything", "1",
                                 "--trainer.default_root_dir", first["run_dir"]]
    # a stage is its own fit: the sweep's base configs and overrides (max_steps 5) are the point's fit's only
    assert second["fit_argv"].count("--config") == 2 and "--trainer.max_steps" not in second["fit_argv"]
    assert _argv_value(staged.fit_argv, "--ckpt_from") == f"{staged.run_dir}/first/checkpoints/last.ckpt"
    assert _argv_value(staged.fit_argv, "--trainer.max_steps") == "5"
    printed = describe(staged)
    assert printed.index("default_root_dir " + first["run_dir"]) < printed.index("default_root_dir "
                                                                                + second["run_dir"]) \
        < printed.index(f"default_root_dir {staged.run_dir}\n"), "dry runs list the stages first, in order"


@pytest.mark.parametrize("stages, message", [
    ([{"name": "s"}], r"stages\[0\] \(s\) needs its own configs"),
    ([{"configs": ["x.yaml"]}], r"stages\[0\] needs a name"),
    ([{"name": "s", "configs": ["x.yaml"], "argv": []}], r"stages\[0\]: unknown key\(s\) \['argv'\]"),
    ([{"name": "score", "configs": ["x.yaml"]}], "stage and eval names must be unique and not 'fit'"),
    ([{"name": "fit", "configs": ["x.yaml"]}], "stage and eval names must be unique and not 'fit'"),
    ({"name": "s"}, "stages must be a list"),
])
def test_stage_errors_name_the_point_and_key(tmp_path, stages, message):
    path = _staged_sweep(tmp_path, "r.yaml", points=[{"name": "p", "stages": stages}], baseline=None)
    with pytest.raises(SweepError, match=message):
        load_sweep(path)


def test_a_stage_is_checked_by_lightning_and_gets_its_resolved_config(tmp_path, capsys):
    recipe = _write(tmp_path / "base.yaml", {
        "trainer": {"max_steps": 3, "accelerator": "cpu"},
        "model": {"class_path": DEMO_MODEL, "init_args": {"out_dim": "${trainer.max_steps}"}},
        "data": {"class_path": BORING_DATA},
    })
    points = [{"name": "staged", "stages": [{"name": "warmup", "configs": [recipe],
                                             "overrides": {"trainer.max_steps": 4}}]}]
    path = _staged_sweep(tmp_path, recipe, points=points, baseline=None, evals=None, seeds=[0])
    (run,) = prepare(load_sweep(path), tmp_path / "out", log=lambda _: None)
    stage_config = yaml.safe_load((Path(run.stages[0]["run_dir"]) / "resolved_config.yaml").read_text())
    assert stage_config["model"]["init_args"]["out_dim"] == 4, "the stage's own max_steps, not the sweep's 5"
    assert yaml.safe_load((Path(run.run_dir) / "resolved_config.yaml").read_text())["trainer"]["max_steps"] == 5
    typo = [{"name": "staged", "stages": [{"name": "warmup", "configs": [recipe],
                                           "overrides": {"model.init_args.out_dimm": 4}}]}]
    path = _staged_sweep(tmp_path, recipe, points=typo, baseline=None, evals=None, seeds=[0])
    assert cli(["sweep", "run", path, "--out", str(tmp_path / "out2"), "--dry_run", "true"]) == 2
    err = capsys.readouterr().err
    assert "point 'staged' (seed 0), stage 'warmup'" in err and "out_dimm" in err
    missing = [{"name": "staged", "stages": [{"name": "warmup", "configs": [str(tmp_path / "absent.yaml")]}]}]
    with pytest.raises(SweepError, match="point 'staged', stage 'warmup': config file not found"):
        prepare(load_sweep(_staged_sweep(tmp_path, recipe, points=missing, baseline=None)), tmp_path / "out3",
                check=False, log=lambda _: None)


# The sweep tests' stand-in for `python -m lit_star`, which also appends each call's argv to order.jsonl beside it.
ORDERED_FAKE = ("import json, os, sys\n"
                "with open(os.path.join(os.path.dirname(__file__), 'order.jsonl'), 'a') as log:\n"
                "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n") + FAKE_LIT_STAR


def _fake(tmp_path: Path) -> tuple[str]:
    (tmp_path / "fake_lit_star.py").write_text(ORDERED_FAKE)
    return (str(tmp_path / "fake_lit_star.py"),)


def _roots(run) -> list[str]:
    """The default_root_dir of every fit of ``run`` the fake ran, in the order they ran."""
    order = Path(run.run_dir).parents[2] / "fake_lit_star.py"
    calls = [json.loads(line) for line in order.with_name("order.jsonl").read_text().splitlines()]
    roots = [_argv_value(argv, "--trainer.default_root_dir") for argv in calls if argv[0] == "fit"]
    return [root for root in roots if root.startswith(run.run_dir)]


def test_stages_run_in_order_before_the_fit_and_a_rerun_skips_them(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {})
    fake = _fake(tmp_path)
    staged, _ = prepare(load_sweep(_staged_sweep(tmp_path, recipe, seeds=[0])), tmp_path / "out", check=False,
                        log=lambda _: None)
    status = RunJob(staged, lit_star=fake)()
    assert status["state"] == "done" and run_finished(staged)
    first, second = (s["run_dir"] for s in staged.stages)
    assert _roots(staged) == [first, second, staged.run_dir]
    assert list(status["steps"]) == ["first", "second", "fit", "score"]
    assert (Path(first) / "checkpoints/last.ckpt").is_file() and (Path(staged.run_dir) / "logs/first.log").is_file()
    RunJob(staged, lit_star=fake)()
    assert len(_roots(staged)) == 3, "finished stages and fit ran again"


def test_a_failing_stage_stops_its_run_and_an_interrupted_one_resumes(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {})
    fake = _fake(tmp_path)
    points = [{"name": "staged", "stages": [
        {"name": "first", "configs": [recipe]},
        {"name": "second", "configs": [recipe], "overrides": {"model.init_args.fail": True}}]}]
    (run,) = prepare(load_sweep(_staged_sweep(tmp_path, recipe, points=points, baseline=None, seeds=[0])),
                     tmp_path / "out", check=False, log=lambda _: None)
    status = RunJob(run, lit_star=fake)()
    assert status["state"] == "failed" and status["failed_step"] == "second"
    assert "Traceback: boom" in status["error"] and Path(status["log"]).name == "second.log"
    assert not (Path(run.run_dir) / "checkpoints").exists(), "no fit after a failed stage"

    # the first stage stopped by a signal at step 1 of 3 (Lightning exits 0): interrupted, resumed from its last.ckpt
    run.stages = run.stages[:1]
    first = Path(run.stages[0]["run_dir"])
    for path in (Path(run.run_dir) / "sweep/done").iterdir():
        path.unlink()
    (first / "resolved_config.yaml").write_text("trainer:\n  max_steps: 3\n")
    torch.save({"global_step": 1}, first / "checkpoints/last.ckpt")
    stopped = tmp_path / "stopped.py"
    stopped.write_text("print('stopping on SIGTERM')\n")
    status = RunJob(run, lit_star=(str(stopped),))()
    assert status["state"] == "interrupted" and "first: the fit stopped at step 1 of 3" in status["error"]
    torch.save({"global_step": 3}, first / "checkpoints/last.ckpt")
    assert RunJob(run, lit_star=fake)()["state"] == "done"
    last_first_call = json.loads((first / "calls.jsonl").read_text().splitlines()[-1])
    assert last_first_call["argv"][-2:] == ["--ckpt_path", "last"]
    assert read_status(run.run_dir)["steps"]["first"]["state"] == "done"


def test_a_changed_stage_is_refused_in_an_existing_run_directory(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {})
    prepare(load_sweep(_staged_sweep(tmp_path, recipe)), tmp_path / "out", check=False, log=lambda _: None)
    points = [{"name": "staged", "stages": [{"name": "first", "configs": [recipe],
                                            "overrides": {"trainer.max_steps": 3}},
                                           {"name": "second", "configs": [recipe, recipe]}],
               "overrides": {"ckpt_from": "${run_dir}/first/checkpoints/last.ckpt"}}]
    changed = load_sweep(_staged_sweep(tmp_path, recipe, points=points, baseline=None))
    with pytest.raises(SweepError, match=r"holds a run made with other fit arguments(.|\n)*first: fit .*max_steps 3"):
        prepare(changed, tmp_path / "out", check=False, log=lambda _: None)


def test_other_ranks_train_every_stage_and_the_fit(tmp_path, monkeypatch):
    recipe = _write(tmp_path / "r.yaml", {})
    fake = _fake(tmp_path)
    staged, _ = prepare(load_sweep(_staged_sweep(tmp_path, recipe, seeds=[0])), tmp_path / "out", check=False,
                        log=lambda _: None)
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert RunJob(staged, lit_star=fake)() == {"state": "done", "rank": 1}
    assert _roots(staged) == [s["run_dir"] for s in staged.stages] + [staged.run_dir]
    assert read_status(staged.run_dir) == {}, "only rank 0 records or evaluates"


# Seconds per training step on one thread, measured for the Table 11 sweep (docs/ablations.md, "Table 11").
TABLE_11_SECONDS_PER_STEP = {"stage2": 1.29, "stage3": 0.36, "stage4": 1.17}


def test_table_11_sweep_compares_the_curriculum_with_one_joint_fit_at_equal_compute(tmp_path, capsys):
    repo = Path(__file__).resolve().parents[2]
    sweep = load_sweep(str(repo / "recipes/sweeps/shapes_11_joint_vs_staged.yaml"))
    staged, joint = expand_runs(sweep, tmp_path / "out")[:2]
    assert (staged.point, joint.point) == ("staged", "joint") and joint.stages == []
    # each stage is its own recipe, first on its argv (fit --config RECIPE ...)
    assert [(s["name"], Path(s["fit_argv"][2]).name) for s in staged.stages] == [
        ("stage2", "stage2_stacked_ar.yaml"), ("stage3", "stage3_diffusion_decoder.yaml")]
    # the staged stage 4 starts from its own stages, never from SHAPES_RUNS' stage 2 / 3 runs
    for key, stage in (("init_stack_from", "stage2"), ("init_decoder_from", "stage3")):
        assert _argv_value(staged.fit_argv, f"--model.init_args.{key}") == f"{staged.run_dir}/{stage}/checkpoints/last.ckpt"
        assert f"--model.init_args.{key}" not in joint.fit_argv
    assert "recipes/shapes/stage4_joint_from_scratch.yaml" in joint.fit_argv
    assert staged.evals == [{**e, "argv": [a.replace(joint.run_dir, staged.run_dir) for a in e["argv"]],
                             "output": e["output"].replace(joint.run_dir, staged.run_dir)} for e in joint.evals]

    def steps(argv: list[str]) -> int:
        return int(_argv_value(argv, "--trainer.max_steps"))

    cost = TABLE_11_SECONDS_PER_STEP
    staged_seconds = sum(steps(s["fit_argv"]) * cost[s["name"]] for s in staged.stages) \
        + steps(staged.fit_argv) * cost["stage4"]
    joint_seconds = steps(joint.fit_argv) * cost["stage4"]
    assert abs(joint_seconds / staged_seconds - 1) < 0.03, (staged_seconds, joint_seconds)

    # every fit of both files through LightningCLI's parser (nothing built), as `sweep run` does first
    assert cli(["sweep", "run", str(repo / "recipes/sweeps/shapes_11_joint_vs_staged.yaml"), "--dry_run", "true",
                "--out", str(tmp_path / "shapes")]) == 0
    printed = capsys.readouterr().out
    assert "4 run(s) of 2 point(s) x 2 seed(s): fit arguments checked" in printed
    assert cli(["sweep", "run", str(repo / "recipes/sweeps/star3b_11_joint_vs_staged.yaml"), "--launcher", "slurm",
                "--dry_run", "true", "--out", str(tmp_path / "star3b")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("stage2_stacked_ar/star_3b.yaml") == 1 and "--trainer.num_nodes 8" in printed
