"""Exact resume: a run killed and resumed from a checkpoint ends with the weights of one that never stopped.

Lightning restores weights, optimizer, schedulers, loop counters and callback states. `ExactResume`
adds what it does not:

* **the data stream**: every lit_star batch carries its loader's position (see
  :mod:`lit_star.data.webdataset_io`); the position of the last batch trained on goes into the
  checkpoint, and the resumed run's training loader continues right after it, in every worker, mid-epoch
  or at an epoch boundary (where Lightning first iterates the loader before advancing its epoch);
* **RNG state**: Python, NumPy and torch (CUDA too) as they were when the checkpoint was taken, restored
  when training starts again. Validation runs on a copy of the RNG state, so where and how often it
  runs does not change training. Loader workers are seeded from (seed, epoch) and every shuffle and
  CFG-dropout draw from (seed, epoch, key), so they need no saved state.

Under DDP / FSDP every rank's state is gathered into the one checkpoint and each rank takes its own back;
the resumed run needs the same number of processes and loader workers (the error says which differs).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from lit_star.data.webdataset_io import STREAM_POSITION_KEY

RESUME_KEY = "lit_star_resume"


def rng_states() -> dict[str, Any]:
    """Every global RNG state that training draws from, in plain picklable types."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), position, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _gather(trainer: Trainer, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``mine``, by rank (called by all ranks together while a checkpoint is written)."""
    if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return [mine]
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


class ExactResume(Callback):
    """Saves the data-stream position and RNG states with every checkpoint and restores them on resume."""

    def __init__(self) -> None:
        self.stream_position: dict[str, Any] | None = None
        self.epoch_finished = False
        self._rng_to_restore: dict[str, Any] | None = None
        self._rng_before_validation: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last), so a checkpoint
        # taken after this batch records it as trained.
        if isinstance(batch, Mapping) and STREAM_POSITION_KEY in batch:
            self.stream_position = batch[STREAM_POSITION_KEY]
            self.epoch_finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        mine = {"stream_position": self.stream_position, "epoch_finished": self.epoch_finished, "rng": rng_states()}
        checkpoint[RESUME_KEY] = {"ranks": _gather(trainer, mine)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RESUME_KEY)
        if saved is None or trainer.state.fn != TrainerFn.FITTING:
            return
        ranks = saved["ranks"]
        if len(ranks) != trainer.world_size:
            raise ValueError(
                f"the checkpoint was written by {len(ranks)} process(es), this run has {trainer.world_size}; exact "
                "resume needs the same trainer.devices x trainer.num_nodes"
            )
        mine = ranks[trainer.global_rank]
        self._rng_to_restore = mine["rng"]
        self.stream_position, self.epoch_finished = mine["stream_position"], mine["epoch_finished"]
        if self.stream_position is None:
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "resume_training_stream"):
            raise TypeError(
                f"the checkpoint holds a data-stream position but the training data comes from "
                f"{type(datamodule).__name__ if datamodule is not None else 'no DataModule'}; pass a lit_star "
                "DataModule (datamodule=...) so the resumed run can continue the stream"
            )
        datamodule.resume_training_stream(self.stream_position, self.epoch_finished)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._rng_before_validation = rng_states()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng_before_validation is not None:
            set_rng_states(self._rng_before_validation)
            self._rng_before_validation = None
