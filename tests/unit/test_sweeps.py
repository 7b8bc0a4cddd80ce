"""Sweeps: expansion, names, checks, launching (resume, failures), collection, the SLURM script."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_star.cli import main as cli
from lit_star.sweeps import collect as collect_mod
from lit_star.sweeps.launch import RunJob, read_status, run_finished, run_local, sbatch_script, slurm_parameters
from lit_star.sweeps.prepare import prepare
from lit_star.sweeps.spec import SweepError, expand_runs, load_sweep, point_name
from tests.sweep_fixtures import fabricated_sweep as _fabricated_sweep

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = "lightning.pytorch.demos.boring_classes.DemoModel"
BORING_DATA = "lightning.pytorch.demos.boring_classes.BoringDataModule"


def _write(path: Path, content) -> str:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


@pytest.fixture
def recipe(tmp_path):
    return _write(tmp_path / "base.yaml", {
        "trainer": {"max_steps": 3, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": DEMO_MODEL, "init_args": {"out_dim": "${trainer.max_steps}"}},
        "data": {"class_path": BORING_DATA},
    })


def _sweep_file(tmp_path, recipe, **changes) -> str:
    content = {
        "name": "demo",
        "configs": [recipe],
        "overrides": {"trainer.limit_val_batches": 1, "model.init_args.learning_rate": 0.5},
        "grid": {"trainer.max_steps": [2, 4], "model.init_args.learning_rate": [0.1, 0.2]},
        "points": [{"name": "long", "configs": [recipe], "overrides": {"trainer.max_steps": 8}}],
        "seeds": [0, 1],
        "evals": [{"name": "score", "argv": ["eval", "shapes", "--ckpt", "${run_dir}/checkpoints/last.ckpt",
                                             "--out", "${run_dir}/eval/${point}_s${seed}"],
                   "output": "${run_dir}/eval/score.json"}],
        "metrics": {"loss": {"tensorboard": "val/loss"}, "acc": {"json": "eval/score.json", "key": "overall.score"}},
        "baseline": {"trainer.max_steps": 2, "model.init_args.learning_rate": 0.1},
    }
    content.update(changes)
    return _write(tmp_path / "sweep.yaml", {k: v for k, v in content.items() if v is not None})


def _argv_value(argv, flag):
    """The last value given to ``flag`` (later flags win in LightningCLI)."""
    return [b for a, b in zip(argv, argv[1:]) if a == flag][-1]


def test_grid_expands_to_the_product_plus_points_times_seeds_with_later_overrides_winning(tmp_path, recipe):
    sweep = load_sweep(_sweep_file(tmp_path, recipe))
    assert sweep.axes == ["trainer.max_steps", "model.init_args.learning_rate"]
    assert [p.name for p in sweep.points] == ["learning_rate=0.1,max_steps=2", "learning_rate=0.2,max_steps=2",
                                              "learning_rate=0.1,max_steps=4", "learning_rate=0.2,max_steps=4", "long"]
    runs = expand_runs(sweep, tmp_path / "out")
    # seed-major: every point's seed 0 first, so a sweep cut short still has whole rows
    assert len(runs) == 10 and [r.seed for r in runs] == [0] * 5 + [1] * 5
    first = runs[0]
    assert first.run_dir == str(tmp_path / "out/learning_rate=0.1,max_steps=2/seed0")
    # the point's learning rate wins over the sweep-wide 0.5; the seed and run directory come last
    assert _argv_value(first.fit_argv, "--model.init_args.learning_rate") == "0.1"
    assert _argv_value(first.fit_argv, "--trainer.limit_val_batches") == "1"
    assert first.fit_argv[-4:] == ["--seed_everything", "0", "--trainer.default_root_dir", first.run_dir]
    assert first.axes == {"trainer.max_steps": 2, "model.init_args.learning_rate": 0.1}
    # ${run_dir}, ${point} and ${seed} resolve per run
    assert first.evals[0]["argv"][3] == f"{first.run_dir}/checkpoints/last.ckpt"
    assert first.evals[0]["argv"][-1] == f"{first.run_dir}/eval/learning_rate=0.1,max_steps=2_s0"
    assert first.evals[0]["output"] == f"{first.run_dir}/eval/score.json"
    long = runs[4]
    assert long.point == "long" and long.fit_argv.count("--config") == 2 and _argv_value(long.fit_argv, "--trainer.max_steps") == "8"
    assert _argv_value(long.fit_argv, "--model.init_args.learning_rate") == "0.5"


def test_interpolation_env_and_escaped_lightning_references(tmp_path, recipe, monkeypatch):
    monkeypatch.setenv("SWEEP_TEST_ROOT", "/data/here")
    path = _sweep_file(tmp_path, recipe, grid=None, baseline=None,
                       points=[{"name": "p", "overrides": {"model.init_args.out_dim": "\\${trainer.max_steps}",
                                                           "trainer.default_root_dir": "ignored"}}],
                       env={"SHAPES_RUNS": "${oc.env:SWEEP_TEST_ROOT}/runs", "WHERE": "${sweep_dir}"})
    (run,) = expand_runs(load_sweep(path), tmp_path / "out", )[:1]
    assert run.env == {"SHAPES_RUNS": "/data/here/runs", "WHERE": str(tmp_path / "out")}
    # an escaped reference reaches LightningCLI untouched, to resolve against the merged recipe there
    assert _argv_value(run.fit_argv, "--model.init_args.out_dim") == "${trainer.max_steps}"
    assert _argv_value(run.fit_argv, "--trainer.default_root_dir") == run.run_dir, "the run directory always wins"
    broken = _sweep_file(tmp_path, recipe, evals=[{"name": "x", "argv": ["eval", "${nowhere}"]}])
    with pytest.raises(SweepError, match="interpolation failed .*nowhere"):
        expand_runs(load_sweep(broken), tmp_path / "out")


def test_the_same_point_gets_the_same_directory_whatever_else_the_sweep_holds(tmp_path, recipe):
    one = load_sweep(_sweep_file(tmp_path, recipe, points=None))
    two = load_sweep(_sweep_file(tmp_path, recipe, points=None, baseline=None,
                                 grid={"model.init_args.learning_rate": [0.2, 0.1], "trainer.max_steps": [9, 4]}))
    assert {p.name for p in one.points} & {p.name for p in two.points} == {"learning_rate=0.1,max_steps=4",
                                                                          "learning_rate=0.2,max_steps=4"}
    assert point_name([("b.x", 1), ("a.y", "s")]) == point_name([("a.y", "s"), ("b.x", 1)]) == "y=s,x=1"
    assert point_name([("model.lr", 1), ("optim.lr", 2)]) == "model.lr=1,optim.lr=2", "clashing last parts stay long"
    long = point_name([(f"model.init_args.key{i}", "v" * 20) for i in range(8)])
    assert len(long) <= 96 and long == point_name([(f"model.init_args.key{i}", "v" * 20) for i in range(8)])
    assert long != point_name([(f"model.init_args.key{i}", "v" * 20) for i in range(7)] + [("model.init_args.key7", "w")])
    options = load_sweep(_sweep_file(tmp_path, recipe, points=None, baseline="init=vlm", grid={"init": [
        {"name": "vlm", "overrides": {"model.init_args.out_dim": 4}}, {"name": "rand", "configs": [recipe]}]}))
    assert [p.name for p in options.points] == ["init=vlm", "init=rand"]


@pytest.mark.parametrize("change, message", [
    ({"grids": {}}, r"unknown top-level key\(s\) \['grids'\]"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"grid": {"model.init_args.learning_rate": []}}, "grid.model.init_args.learning_rate must be a non-empty list"),
    ({"metrics": {"loss": {"tensorboard": "a", "json": "b"}}}, "metrics.loss needs exactly one of"),
    ({"metrics": {"acc": {"json": "x.json"}}}, "metrics.acc: a json metric needs 'key'"),
    ({"evals": [{"name": "e", "arg": ["x"]}]}, r"evals\[0\]: unknown key\(s\) \['arg'\]"),
    ({"points": [{"name": "p", "overides": {"a": 1}}]}, r"points\[0\]: unknown key\(s\) \['overides'\]"),
    ({"baseline": "nope"}, "baseline 'nope' names no point"),
    ({"slurm": {"gpus": 8}}, r"slurm: unknown key\(s\) \['gpus'\]"),
])
def test_sweep_file_errors_name_the_bad_key(tmp_path, recipe, change, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_sweep_file(tmp_path, recipe, **change))


def test_config_errors_are_caught_before_any_launch_naming_the_key_or_file(tmp_path, recipe, capsys):
    missing = _sweep_file(tmp_path, recipe, grid=None, baseline=None,
                          points=[{"name": "p", "configs": [str(tmp_path / "absent.yaml")]}])
    with pytest.raises(SweepError, match="point 'p': config file not found: .*absent.yaml"):
        prepare(load_sweep(missing), tmp_path / "out", log=lambda _: None)
    typo = _sweep_file(tmp_path, recipe, grid=None, baseline=None, evals=None,
                       points=[{"name": "typo", "overrides": {"model.init_args.learning_rat": 0.1}}])
    code = cli(["sweep", "run", typo, "--out", str(tmp_path / "out2")])
    assert code == 2
    err = capsys.readouterr().err
    assert "point 'typo'" in err and "learning_rat" in err
    assert not (tmp_path / "out2").exists(), "nothing written or launched"
    good = _sweep_file(tmp_path, recipe, grid=None, baseline=None, seeds=[3],
                       points=[{"name": "ok", "overrides": {"trainer.max_steps": 7}}])
    (run,) = prepare(load_sweep(good), tmp_path / "out3", log=lambda _: None)
    resolved = yaml.safe_load((Path(run.run_dir) / "resolved_config.yaml").read_text())
    assert resolved["model"]["init_args"]["out_dim"] == 7 and resolved["seed_everything"] == 3
    assert json.loads((tmp_path / "out3/sweep_index.json").read_text())["runs"][0]["run_dir"] == run.run_dir


# Stands in for `python -m lit_star`: `fit` writes checkpoints/last.ckpt and a record of its argv (exit 3
# when told --model.init_args.fail true); any other command writes the file after --out.
FAKE_LIT_STAR = """
import json, os, sys, time
argv = sys.argv[1:]
def value(flag):
    return [b for a, b in zip(argv, argv[1:]) if a == flag][-1]
if argv[0] == "fit":
    root = value("--trainer.default_root_dir")
    os.makedirs(f"{root}/checkpoints", exist_ok=True)
    with open(f"{root}/calls.jsonl", "a") as f:
        f.write(json.dumps({"argv": argv, "threads": os.environ.get("OMP_NUM_THREADS"),
                            "env": os.environ.get("SWEEP_FAKE_ENV"),
                            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    print("training", flush=True)
    if "--model.init_args.fail" in argv and value("--model.init_args.fail") == "true":
        print("Traceback: boom", flush=True)
        sys.exit(3)
    open(f"{root}/checkpoints/last.ckpt", "w").write("ckpt")
else:
    out = value("--out")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump({"overall": {"score": float(value("--score"))}}, open(out, "w"))
"""


def _fake_sweep(tmp_path, seeds=(0, 1)):
    (tmp_path / "fake_lit_star.py").write_text(FAKE_LIT_STAR)
    recipe = _write(tmp_path / "r.yaml", {})
    path = _write(tmp_path / "fake.yaml", {
        "configs": [recipe], "seeds": list(seeds), "env": {"SWEEP_FAKE_ENV": "${point}"},
        "grid": {"model.init_args.fail": [False, True]},
        "evals": [{"name": "score", "argv": ["score", "--score", "${seed}", "--out", "${run_dir}/eval/score.json"],
                   "output": "${run_dir}/eval/score.json"}],
        "metrics": {"score": {"json": "eval/score.json", "key": "overall.score"}},
    })
    sweep = load_sweep(path)
    runs = prepare(sweep, tmp_path / "out", check=False, log=lambda _: None)
    return runs, (str(tmp_path / "fake_lit_star.py"),)


def _calls(run):
    path = Path(run.run_dir) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_failing_point_is_recorded_with_its_log_and_the_others_finish(tmp_path):
    runs, fake = _fake_sweep(tmp_path)
    logs = []
    results = run_local(runs, tmp_path / "out", max_parallel=2, threads=2, lit_star=fake, log=logs.append,
                        poll_seconds=0.1)
    good, bad = [r for r in runs if "fail=False" in r.point], [r for r in runs if "fail=True" in r.point]
    assert {results[r.run_dir] for r in good} == {"done"} and {results[r.run_dir] for r in bad} == {"failed"}
    for run in bad:
        status = read_status(run.run_dir)
        assert status["failed_step"] == "fit" and status["steps"]["fit"]["returncode"] == 3
        assert "Traceback: boom" in status["error"] and Path(status["log"]).name == "fit.log"
        assert not (Path(run.run_dir) / "eval").exists(), "no eval after a failed fit"
    for run in good:
        assert run_finished(run)
        (call,) = _calls(run)
        assert call["threads"] == "1" and call["env"] == run.point, "thread budget and sweep env reach the step"
    assert any("failed: fit exited with 3" in line for line in logs)


def test_a_fit_that_exits_0_before_its_last_step_is_interrupted_not_done(tmp_path):
    # Lightning stops gracefully on SIGTERM and exits 0: a killed fit must not be marked done.
    import torch

    runs, fake = _fake_sweep(tmp_path, seeds=(0,))
    run = runs[0]
    (Path(run.run_dir) / "resolved_config.yaml").write_text("trainer:\n  max_steps: 10\n")
    (Path(run.run_dir) / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4}, Path(run.run_dir) / "checkpoints/last.ckpt")
    stopped = tmp_path / "stopped.py"
    stopped.write_text("print('stopping on SIGTERM')\n")  # exits 0, leaves the step-4 checkpoint
    status = RunJob(run, lit_star=(str(stopped),))()
    assert status["state"] == "interrupted" and "stopped at step 4 of 10" in status["error"]
    assert not (Path(run.run_dir) / "sweep/done/fit").exists()
    torch.save({"global_step": 10}, Path(run.run_dir) / "checkpoints/last.ckpt")
    status = RunJob(run, lit_star=fake)()
    assert status["state"] == "done" and _calls(run)[-1]["argv"][-2:] == ["--ckpt_path", "last"]


def test_parallel_local_runs_get_their_own_gpus(tmp_path):
    runs, fake = _fake_sweep(tmp_path, seeds=(0, 1))
    good = [r for r in runs if "fail=False" in r.point]
    run_local(good, tmp_path / "out", max_parallel=2, gpus=[2, 5], gpus_per_run=1, lit_star=fake, log=lambda _: None,
              poll_seconds=0.1)
    assert sorted(_calls(run)[0]["gpus"] for run in good) == ["2", "5"]
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        run_local(good, tmp_path / "out", max_parallel=2, gpus=[0, 1], gpus_per_run=2, lit_star=fake)


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones_from_last_ckpt(tmp_path):
    runs, fake = _fake_sweep(tmp_path, seeds=(0, 1))
    good = [r for r in runs if "fail=False" in r.point]
    run_local(good[:1], tmp_path / "out", lit_star=fake, log=lambda _: None, poll_seconds=0.1)
    # seed 1 was interrupted mid-fit: a last.ckpt, a status saying running, a process long gone
    interrupted = good[1]
    (Path(interrupted.run_dir) / "checkpoints").mkdir(parents=True)
    (Path(interrupted.run_dir) / "checkpoints/last.ckpt").write_text("old")
    (Path(interrupted.run_dir) / "sweep/status.json").write_text(json.dumps(
        {"state": "running", "host": os.uname().nodename, "pid": 2 ** 22 + 12345, "started_at": 0}))
    from lit_star.sweeps.status import run_states

    states = {(r["point"], r["seed"]): r["state"] for r in run_states(tmp_path / "out")}
    assert states[(interrupted.point, 1)] == "interrupted" and states[(good[0].point, 0)] == "done"
    logs = []
    results = run_local(good, tmp_path / "out", lit_star=fake, log=logs.append, poll_seconds=0.1)
    assert results == {good[0].run_dir: "done", interrupted.run_dir: "done"}
    assert len(_calls(good[0])) == 1, "a finished run ran again"
    assert any("seed 0: done already, skipping" in line for line in logs)
    assert any("seed 1: started (resuming from last.ckpt)" in line for line in logs)
    (call,) = _calls(interrupted)
    assert call["argv"][-2:] == ["--ckpt_path", "last"]
    assert read_status(interrupted.run_dir)["attempts"] == 1


def test_collect_on_fabricated_runs_gives_the_known_table(tmp_path):
    _fabricated_sweep(tmp_path)
    results = collect_mod.collect(tmp_path / "sweep")
    table = {e["point"]: e for e in results.table}
    one = table["num_stack_layers=1"]
    assert one["val_loss_mean"] == pytest.approx(1.1) and one["val_loss_std"] == pytest.approx(0.1)
    assert one["best_loss_mean"] == pytest.approx(0.8) and one["val_loss_n"] == 3 and one["done"] == 3
    two = table["num_stack_layers=2"]
    assert two["val_loss_mean"] == pytest.approx(0.6) and two["val_loss_n"] == 2 and two["done"] == 2
    assert table["num_stack_layers=4"]["colour_mean"] == pytest.approx(0.41)
    # step: N reads the last value logged at or before N (Lightning logs a validation after step N at N - 1)
    run_dir = results.index["runs"][0]["run_dir"]
    assert collect_mod.read_metric(run_dir, {"tensorboard": "val/loss", "step": 29}) == pytest.approx(0.7)
    assert collect_mod.read_metric(run_dir, {"tensorboard": "val/loss", "step": 5}) is None
    versus = {(c["point"], c["metric"]): c for c in results.comparisons}
    c = versus[("num_stack_layers=1", "val_loss")]
    assert c["pairs"] == 3 and c["diff_mean"] == pytest.approx(0.2) and c["diff_std"] == pytest.approx(0.0, abs=1e-6)
    assert (c["higher"], c["lower"], c["sign_test_p"]) == (3, 0, 0.25)
    assert versus[("num_stack_layers=2", "val_loss")]["pairs"] == 2
    assert versus[("num_stack_layers=2", "val_loss")]["diff_mean"] == pytest.approx(-0.25)

    with open(tmp_path / "sweep/results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["point"] for r in rows] == ["num_stack_layers=1", "num_stack_layers=2", "num_stack_layers=4"]
    assert float(rows[0]["val_loss_mean"]) == pytest.approx(1.1) and rows[0]["model.init_args.num_stack_layers"] == "1"
    assert float(rows[0]["val_loss_sign_test_p"]) == 0.25 and rows[2]["val_loss_diff_mean"] == ""
    md = (tmp_path / "sweep/results.md").read_text()
    assert "| num_stack_layers=1 | 1 | 3/3 | 1.1000 ± 0.1000 (3) | 0.8000 ± 0.1000 (3) | 0.1100 ± 0.0100 (3) |" in md
    assert "| num_stack_layers=1 | val_loss | 0.2000 ± 0.0000 | 3 | 3 / 0 | 0.250 |" in md
    assert "![colour binding](plots/colour.png)" in md
    for metric in ("val_loss", "best_loss", "colour"):
        assert (tmp_path / "sweep/plots" / f"{metric}.png").stat().st_size > 1000
    assert len(list((tmp_path / "sweep/hparams").rglob("events.out.tfevents.*"))) == 8


def test_sign_test_and_std():
    assert collect_mod.sign_test([1, 2, 3, 4]) == pytest.approx(0.125)
    assert collect_mod.sign_test([1, -1, 0]) == 1.0 and collect_mod.sign_test([0.0]) is None
    assert collect_mod.mean_std([2.0]) == (2.0, None)


def test_status_lists_done_running_failed_with_wall_times(tmp_path, capsys):
    runs = _fabricated_sweep(tmp_path)
    (Path(runs[1].run_dir) / "sweep/status.json").write_text(json.dumps(
        {"state": "failed", "failed_step": "binding", "log": "/x/binding.log", "error": "binding exited with 1",
         "steps": {"fit": {"seconds": 120.0}, "binding": {"seconds": 3.0}}}))
    (Path(runs[2].run_dir) / "sweep/status.json").write_text(json.dumps(
        {"state": "running", "host": "elsewhere", "pid": 1, "started_at": 0,
         "steps": {"fit": {"state": "running"}}}))
    assert cli(["sweep", "status", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "failed (binding)" in out and "log: /x/binding.log" in out and "running (fit)" in out
    assert "1.0 min" in out and "fit 120, binding 3" in out
    assert "6 done, 1 failed, 1 pending, 1 running of 9 run(s)" in out


def test_slurm_sbatch_script_as_text(tmp_path, recipe, capsys):
    path = _sweep_file(tmp_path, recipe, slurm={"partition": "gpu", "gpus_per_node": 8, "nodes": 2, "time": 4320,
                                                "cpus_per_task": 12, "setup": ["module load cuda"]})
    assert cli(["sweep", "run", path, "--launcher", "slurm", "--dry_run", "true", "--max_parallel", "3",
                               "--time", "600", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for line in ["#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --time=600",
                 "#SBATCH --array=0-9%3", "#SBATCH --job-name=sweep_demo", "module load cuda",
                 "srun --unbuffered --output", "-u -m submitit.core._submit"]:
        assert line in out, line
    assert "--trainer.devices 8 --trainer.num_nodes 2" in out, "multi-GPU points run one Lightning rank per task"
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    params = slurm_parameters({"gpus_per_node": 1}, runs=4, max_parallel=None, job_name="x")
    assert params["ntasks_per_node"] == 1 and params["array_parallelism"] == 4
    assert "#SBATCH --array=0-3%4" in sbatch_script({**params, "map_count": 4}, tmp_path / "%j")


def test_run_job_on_another_rank_only_trains(tmp_path, monkeypatch):
    runs, fake = _fake_sweep(tmp_path, seeds=(0,))
    monkeypatch.setenv("SLURM_PROCID", "1")
    result = RunJob(runs[0], lit_star=fake)()
    assert result == {"state": "done", "rank": 1}
    assert len(_calls(runs[0])) == 1 and read_status(runs[0].run_dir) == {}, "only rank 0 records or evaluates"


def test_every_sweep_file_in_recipes_loads_and_expands(tmp_path):
    files = sorted((REPO / "recipes/sweeps").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        sweep = load_sweep(str(path))
        runs = expand_runs(sweep, tmp_path / path.stem)
        assert runs and all(r.fit_argv[0] == "fit" for r in runs), path
        assert sweep.raw.get("metrics"), f"{path} collects no metric"


def test_sweeps_sharing_runs_dir_train_a_common_point_once_and_refuse_a_changed_one(tmp_path, recipe, capsys):
    shared = str(tmp_path / "shared_runs")
    grid_a = {"model.init_args.learning_rate": [0.1, 0.2], "trainer.max_steps": [4]}
    grid_b = {"model.init_args.learning_rate": [0.1], "trainer.max_steps": [4, 6]}
    a = load_sweep(_sweep_file(tmp_path, recipe, points=None, baseline=None, runs_dir=shared, grid=grid_a))
    runs_a = prepare(a, tmp_path / "a", check=False, log=lambda _: None)
    b = load_sweep(_sweep_file(tmp_path, recipe, points=None, baseline=None, runs_dir=shared, grid=grid_b))
    runs_b = prepare(b, tmp_path / "b", check=False, log=lambda _: None)
    common = {r.run_dir for r in runs_a} & {r.run_dir for r in runs_b}
    assert common == {f"{shared}/learning_rate=0.1,max_steps=4/seed0", f"{shared}/learning_rate=0.1,max_steps=4/seed1"}
    changed = load_sweep(_sweep_file(tmp_path, recipe, points=None, baseline=None, runs_dir=shared, grid=grid_a,
                                     overrides={"trainer.limit_val_batches": 2}))
    with pytest.raises(SweepError, match="holds a run made with other fit arguments"):
        prepare(changed, tmp_path / "a", check=False, log=lambda _: None)


def test_seeds_and_points_flags_launch_a_subset_but_the_index_lists_every_run(tmp_path, recipe, capsys):
    path = _sweep_file(tmp_path, recipe, evals=None)
    out = tmp_path / "out"
    assert cli(["sweep", "run", path, "--out", str(out), "--seeds", "1", "--points", "long", "--dry_run", "true",
                               "--check", "false"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("# ") == 1 and "# long seed 1" in printed
    assert cli(["sweep", "run", path, "--out", str(out), "--seeds", "7", "--check", "false"]) == 2
    assert "--seeds [7] are not seeds of the sweep file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_two_point_smoke_sweep_runs_end_to_end_through_the_local_executor(smoke_curriculum, tmp_path):
    run, _ = smoke_curriculum  # world, base, VQ and codes of the smoke curriculum (conftest, once per session)
    env = {**os.environ, "SHAPES_RUNS": str(run), "SHAPES_WORLD": str(run / "world"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "lit_star", "sweep", "run", "recipes/sweeps/shapes_smoke.yaml", "--out", str(out),
               "--max_parallel", "2"]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 of 2 run(s) done" in first.stdout
    for init in ("vlm", "rand"):
        run_dir = out / f"stack_init={init}" / "seed0"
        assert (run_dir / "checkpoints/last.ckpt").is_file() and (run_dir / "eval/binding.json").is_file()
        assert yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["model"]["init_args"]["stack_init"] == init
        assert read_status(run_dir)["state"] == "done"

    collected = subprocess.run([sys.executable, "-m", "lit_star", "sweep", "collect", str(out)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stderr[-3000:]
    results = collect_mod.load_results(out)
    assert all(entry["val_loss_n"] == 1 and entry["binding_colour_n"] == 1 for entry in results.table)
    assert [c["pairs"] for c in results.comparisons if c["metric"] == "val_loss"] == [1]
    assert (out / "plots/val_loss.png").is_file() and list((out / "hparams").rglob("events.out.tfevents.*"))
    assert "| stack_init=rand | rand | 1/1 |" in (out / "results.md").read_text()

    status = subprocess.run([sys.executable, "-m", "lit_star", "sweep", "status", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "2 done of 2 run(s)" in status.stdout, status.stdout + status.stderr
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already, skipping") == 2, again.stdout[-2000:]
