"""LightningCLI front end shared by every stage.

    python -m lit_star fit --config recipes/shapes/stage1_vq.yaml
    python -m lit_star fit --config recipes/stage2_stacked_ar/star_3b.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/shapes/stage1_vq.yaml --ckpt_path last      # resume

What every run gets without asking:

* one run directory (``trainer.default_root_dir``) holding ``tensorboard/`` and ``checkpoints/``;
* a ``last.ckpt`` plus periodic ``step########.ckpt`` files (``--checkpoint.every_n_train_steps``),
  ``last.ckpt`` also at the final step whatever the period, each written atomically (temporary file,
  fsync, rename) so a kill during a save leaves the previous ``last`` intact; the temporary files such
  a kill leaves are removed when the next run starts, and a save always replaces ``last.ckpt`` (never
  ``last-v1.ckpt``), even in a run directory that was moved or copied;
* ``seed_everything(seed, workers=True)`` before any class is built (``--seed_everything``);
* exact resume (`lit_star.resume.ExactResume`): data-stream position and RNG states ride in every checkpoint;
* ``${...}`` interpolation resolved after every ``--config`` file and command-line override merged;
* a CPU thread count that follows ``LIT_STAR_THREADS_FILE`` when a curriculum sets it (``ThreadBudget``).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn
from lightning.pytorch.loggers import TensorBoardLogger

import torch

from lit_star.data.health import DataHealthMonitor
from lit_star.resume import ExactResume
from lit_star.thread_budget import GROW_AT_STEP_ENV, THREADS_FILE_ENV, read_thread_budget

DEFAULT_RUN_DIR = "runs/default"
TEMPORARY_SUFFIX = ".tmp"


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final step.

    Lightning writes ``last`` only when a periodic save fires (or if none ever did), so a run of 850
    steps saved every 250 ended with a ``last.ckpt`` of step 750, and everything downstream (export,
    tokenize, stage 2) silently used the older weights.

    At the start of a run global rank 0 removes the temporary files (`AtomicCheckpointIO`) that a
    process killed during a save left in ``dirpath``.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None and os.path.isdir(self.dirpath):
            for leftover in Path(self.dirpath).glob(f".*{TEMPORARY_SUFFIX}"):
                leftover.unlink()
                print(f"[checkpoint] removed {leftover}, left by a run killed while saving", flush=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``path`` via a sibling temporary file and ``os.replace``.

    A crash or kill mid-save leaves at most a stray ``*.tmp`` file; the checkpoint that ``path``
    named before (typically ``last.ckpt``) stays loadable.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class ThreadBudget(Callback):
    """Follows the CPU thread budget in the file named by ``LIT_STAR_THREADS_FILE`` (see
    :mod:`lit_star.thread_budget`): before each training and validation batch, when the file has
    changed, ``torch.set_num_threads`` takes its value. Without the variable it does nothing.

    With ``grow_at_step`` (``LIT_STAR_GROW_AT_STEP``) the count changes exactly once, at that training step:
    the run keeps its starting threads before it, waits there until the budget offers more, and keeps
    those to its end. A step's float sums then depend on the step alone, never on when a neighbour ended.
    """

    def __init__(self, path: str | None = None, grow_at_step: int | None = None, poll_seconds: float = 0.5) -> None:
        self.path = path or os.environ.get(THREADS_FILE_ENV)
        if grow_at_step is None and os.environ.get(GROW_AT_STEP_ENV):
            grow_at_step = int(os.environ[GROW_AT_STEP_ENV])
        self.grow_at_step = grow_at_step
        self.poll_seconds = poll_seconds
        self._seen_version: tuple[int, int] | None = None
        self._grown = False

    def _follow(self) -> None:
        if not self.path:
            return
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        # Each write replaces the file, so the inode tells two writes apart within one clock tick.
        version = (stat.st_ino, stat.st_mtime_ns)
        if version == self._seen_version:
            return
        self._seen_version = version
        threads = read_thread_budget(self.path)
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def _grow_once(self, step: int) -> None:
        if self._grown or step < self.grow_at_step or not self.path:
            return
        start, before = time.monotonic(), torch.get_num_threads()
        print(f"[threads] step {step}: waiting for more than {before} thread(s) (grow_at_step {self.grow_at_step})",
              flush=True)
        while (granted := read_thread_budget(self.path) or 0) <= before:
            time.sleep(self.poll_seconds)
        torch.set_num_threads(granted)
        self._grown = True
        print(f"[threads] step {step}: {granted} thread(s) after {time.monotonic() - start:.1f} s", flush=True)

    def _on_batch(self, trainer: Trainer) -> None:
        if self.grow_at_step is None:
            self._follow()
        else:
            self._grow_once(trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._on_batch(trainer)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._on_batch(trainer)


class _OuterModuleInstantiator(_InstantiatorFn):
    """Lightning's instantiator hands every LightningModule (LightningDataModule) it builds the whole ``model``
    (``data``) config as its hyperparameters. A module nested in another's init_args (stage 4's ``stacked_ar`` and
    ``diffusion_decoder``, a mixture's components) would then record its parent's arguments and miss its own
    (``hparams.vq_path``), so only the class the config's ``class_path`` names gets them; nested ones are built
    plainly and ``save_hyperparameters`` reads their own arguments."""

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
        self.cli._dump_config()
        class_path = self.cli.config_dump.get(self.key, {}).get("class_path")
        if class_path is not None and _import_class(class_path) is not class_type:
            return class_type(*args, **kwargs)
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class StarCLI(LightningCLI):
    """LightningCLI with lit_star's run-directory, checkpoint and interpolation defaults."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        # Paths inside recipes stay relative to the working directory, not to the YAML file.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+", "default_env": False})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Every lit_star batch reports skipped samples; the monitor logs them and stops a run that skips too much.
        # ThreadBudget lets the curriculum hand a run the cores a finished neighbour step freed.
        # ExactResume saves the data position and RNG states so a resumed run matches an uninterrupted one.
        kwargs.setdefault("trainer_defaults", {"callbacks": [DataHealthMonitor(), ThreadBudget(), ExactResume()]})
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "trainer.default_root_dir": DEFAULT_RUN_DIR,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                # A name is a step (or "last"): saving it again must replace it. With the version counter a
                # moved run directory got a last-v1.ckpt beside a stale last.ckpt.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments(
            "trainer.default_root_dir",
            "checkpoint.dirpath",
            compute_fn=lambda root: os.path.join(root or DEFAULT_RUN_DIR, "checkpoints"),
        )

    def _add_instantiators(self) -> None:
        for key, class_type in (("model", self._model_class), ("data", self._datamodule_class)):
            self.parser.add_instantiator(_OuterModuleInstantiator(cli=self, key=key), class_type, subclasses=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or DEFAULT_RUN_DIR
            # A fixed version keeps a resumed run's curves in the same TensorBoard folder.
            kwargs["logger"] = TensorBoardLogger(save_dir=root, name="tensorboard", version="")
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def run_trainer_cli(argv: list[str] | None) -> StarCLI:
    """Run ``fit``/``validate``/``test``/``predict`` with ``argv`` (subcommand first; None reads sys.argv)."""
    return StarCLI(args=argv)
