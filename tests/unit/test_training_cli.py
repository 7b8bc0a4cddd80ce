"""The recipe system and run defaults every stage relies on."""

import copy
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from lit_star.cli import TRAINER_SUBCOMMANDS
from lit_star.commands import COMMANDS
from lit_star.data.health import DataHealthMonitor
from lit_star.thread_budget import GROW_AT_STEP_ENV, THREADS_FILE_ENV, write_thread_budget
from lit_star.training import AtomicCheckpointIO, StarCLI

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = "lightning.pytorch.demos.boring_classes.DemoModel"
BORING_DATA = "lightning.pytorch.demos.boring_classes.BoringDataModule"


def _write(path: Path, content: dict) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


@pytest.fixture
def layered_recipe(tmp_path):
    base = _write(
        tmp_path / "base.yaml",
        {
            "trainer": {"max_steps": 5, "accelerator": "cpu", "enable_progress_bar": False,
                        "default_root_dir": str(tmp_path / "run"), "enable_model_summary": False},
            "model": {"class_path": DEMO_MODEL, "init_args": {"out_dim": "${trainer.max_steps}"}},
            "data": {"class_path": BORING_DATA},
        },
    )
    override = _write(tmp_path / "override.yaml", {"trainer": {"max_steps": 6}, "checkpoint": {"every_n_train_steps": 2}})
    return base, override


def test_layered_recipes_interpolate_after_command_line_overrides(layered_recipe):
    base, override = layered_recipe
    cli = StarCLI(args=["--config", base, "--config", override], run=False)
    assert cli.model.l1.out_features == 6, "second --config must win over the first"
    cli = StarCLI(args=["--config", base, "--config", override, "--trainer.max_steps", "9"], run=False)
    assert cli.model.l1.out_features == 9, "a command-line override must reach the interpolated field"


def test_run_dir_gets_tensorboard_and_checkpoints(layered_recipe, tmp_path):
    base, override = layered_recipe
    cli = StarCLI(args=["--config", base, "--config", override], run=False)
    ckpt_callback = cli.trainer.checkpoint_callback
    assert Path(ckpt_callback.dirpath) == tmp_path / "run" / "checkpoints"
    assert ckpt_callback.save_last and ckpt_callback._every_n_train_steps == 2
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "run" / "tensorboard"
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, DataHealthMonitor) for c in cli.trainer.callbacks)


def _fit_restoring_threads(recipe: str, max_steps: int, scheduler: Callback) -> None:
    """Fit ``recipe`` with ``scheduler`` playing the curriculum, then give torch back its thread count."""
    before = torch.get_num_threads()
    try:
        cli = StarCLI(args=["--config", recipe, "--trainer.max_steps", str(max_steps)], run=False)
        cli.trainer.callbacks.append(scheduler)
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        torch.set_num_threads(before)


def test_a_run_follows_the_thread_budget_its_scheduler_writes(layered_recipe, tmp_path, monkeypatch):
    base, _ = layered_recipe
    budget = tmp_path / "threads"
    write_thread_budget(budget, 1)
    monkeypatch.setenv(THREADS_FILE_ENV, str(budget))
    threads_per_step = []

    class GrantAfterTwoSteps(Callback):
        def on_train_batch_end(self, trainer, *args):
            threads_per_step.append(torch.get_num_threads())
            if trainer.global_step == 2:
                write_thread_budget(budget, 2)

    _fit_restoring_threads(base, 4, GrantAfterTwoSteps())
    assert threads_per_step == [1, 1, 2, 2]


def test_a_run_that_grows_at_a_fixed_step_waits_there_for_its_grant_and_keeps_it(layered_recipe, tmp_path,
                                                                                   monkeypatch):
    base, _ = layered_recipe
    budget = tmp_path / "threads"
    write_thread_budget(budget, 1)
    monkeypatch.setenv(THREADS_FILE_ENV, str(budget))
    monkeypatch.setenv(GROW_AT_STEP_ENV, "3")
    threads_per_step, waited = [], []

    class Scheduler(Callback):
        def on_train_batch_end(self, trainer, *args):
            threads_per_step.append(torch.get_num_threads())
            if trainer.global_step == 1:
                write_thread_budget(budget, 2)  # granted early: ignored until step 3
            if trainer.global_step == 2:
                write_thread_budget(budget, 1)  # taken back: step 3 must wait for it
                threading.Timer(0.3, write_thread_budget, (budget, 2)).start()
                waited.append(time.monotonic())
            if trainer.global_step == 4:  # the batch that started at step 3 waited for the timer
                waited[0] = time.monotonic() - waited[0]
                write_thread_budget(budget, 1)  # from then on nothing changes the count again

    _fit_restoring_threads(base, 6, Scheduler())
    assert threads_per_step == [1, 1, 1, 2, 2, 2]
    assert waited[0] >= 0.3, "step 3 started before its threads were granted"


class _CaptureOptimizerAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_resume_from_last_continues_step_and_optimizer_state(layered_recipe, tmp_path):
    base, override = layered_recipe
    fixed = ["--config", base, "--config", override, "--model.init_args.out_dim", "4"]
    StarCLI(args=["fit", *fixed, "--trainer.max_steps", "4"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4

    capture = _CaptureOptimizerAtStart()
    cli = StarCLI(args=[*fixed, "--trainer.max_steps", "6"], run=False)
    cli.trainer.callbacks.append(capture)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert capture.global_step == 4
    saved, restored = last["optimizer_states"][0], capture.optimizer_state
    assert saved["param_groups"] == restored["param_groups"]
    for key, state in saved["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(restored["state"][key][name], value, rtol=0, atol=0)
    assert cli.trainer.global_step == 6


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def dies_midway(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file may be left behind"


@pytest.mark.parametrize("trainer_recipe", sorted((REPO / "recipes" / "trainer").glob("*.yaml")), ids=lambda p: p.stem)
def test_trainer_recipes_parse(trainer_recipe, layered_recipe):
    base, _ = layered_recipe
    # The recipe is parsed and validated; only CPU ones are instantiated here.
    cli = StarCLI(args=["--config", base, "--config", str(trainer_recipe), "--trainer.accelerator", "cpu",
                        "--trainer.devices", "1", "--trainer.precision", "32-true"], run=False)
    expected = yaml.safe_load(trainer_recipe.read_text())["trainer"].get("strategy")
    if isinstance(expected, dict):
        assert type(cli.trainer.strategy).__name__ == expected["class_path"].rsplit(".", 1)[1]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "lit_star", "--help"], capture_output=True, text=True, cwd=REPO, check=True)
    for name in [*TRAINER_SUBCOMMANDS, *COMMANDS]:
        assert f"  {name} " in out.stdout


def test_unknown_subcommand_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "lit_star", "fitt"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "unknown subcommand 'fitt'" in out.stderr


def test_last_checkpoint_holds_the_final_step_between_periodic_saves(layered_recipe, tmp_path):
    base, override = layered_recipe  # saves every 2 steps
    StarCLI(args=["fit", "--config", base, "--config", override, "--trainer.max_steps", "5"])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 5
    assert sorted(p.name for p in checkpoints.glob("step*.ckpt")) == ["step00000002.ckpt", "step00000004.ckpt"]


def test_every_job_parses_its_signature_and_takes_a_config_file(tmp_path, capsys):
    from lit_star.cli import main
    from lit_star.commands import COMMANDS

    def jobs(entries, path=()):
        for name, (_, target) in entries.items():
            yield from jobs(target, (*path, name)) if isinstance(target, dict) else [((*path, name), target)]

    for path, _ in jobs(COMMANDS):  # every job's module imports and its --help renders from its docstring
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert "--config CONFIG" in capsys.readouterr().out, path

    # A job config file and a flag combine; the flag wins. The scorer reports the missing images.
    config = tmp_path / "job.yaml"
    config.write_text(f"prompts: {tmp_path / 'absent.jsonl'}\nimages: {tmp_path}\n")
    assert main(["eval", "shapes", "--config", str(config)]) == 2
    assert "absent.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "shapes", "--config", str(config), "--sampler.top_kk", "3"])
    assert "top_kk" in capsys.readouterr().err


def test_a_group_lists_its_jobs_and_names_an_unknown_one(capsys):
    from lit_star.cli import main

    assert main(["eval", "--help"]) == 0
    assert "  understanding " in capsys.readouterr().out
    assert main(["eval", "shapez"]) == 2
    assert "unknown subcommand 'shapez'" in capsys.readouterr().err
