"""Stage 2 under FSDP2 (Lightning ``ModelParallelStrategy``): 2 CPU processes over gloo vs one process.

The test launches this file under torchrun (``python -m torch.distributed.run --nproc-per-node 2
tests/test_fsdp2.py --worker ...``). Each worker trains 3 steps on its half of every global batch, saving a
distributed checkpoint at step 3, then a fresh Trainer resumes from that checkpoint for step 4. The test
compares the 4 losses with a single-process run that sees the whole global batch each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from tests.stage2_fixtures import TextToImageSamples, loader, write_micro_base, write_small_vq  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
MICRO_BATCH = 2
STEPS_BEFORE_SAVE = 3
TOTAL_STEPS = 4
# One epoch is the 3 steps before the save: a plain DataLoader cannot resume mid-epoch, so step 4 is the
# first batch of epoch 1 in both the resumed and the uninterrupted run.
SAMPLES = STEPS_BEFORE_SAVE * WORLD_SIZE * MICRO_BATCH


class LossRecorder(Callback):
    """Global-batch loss per step: the mean of the ranks' losses (equal token counts per rank)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))


def build_module(base: Path, vq: Path):
    from lit_star.modules.stacked_ar_module import StackedARModule

    return StackedARModule(
        base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2, loss_chunk_size=48, log_images=0
    )


def trainer_kwargs(max_steps: int) -> dict:
    return dict(
        accelerator="cpu",
        max_steps=max_steps,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def run_single_process(base: Path, vq: Path) -> list[float]:
    L.seed_everything(0)
    recorder = LossRecorder()
    trainer = L.Trainer(devices=1, enable_checkpointing=False, callbacks=[recorder], **trainer_kwargs(TOTAL_STEPS))
    trainer.fit(build_module(base, vq), loader(SAMPLES, WORLD_SIZE * MICRO_BATCH, with_codes=True))
    return recorder.losses


def gloo_fsdp2_strategy():
    """FSDP2 over WORLD_SIZE CPU processes (gloo), saving a distributed checkpoint."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1,
                                 save_distributed_checkpoint=True,
                                 process_group_backend="gloo")


def run_workers(test_file: str, *args) -> None:
    """Run ``test_file --worker ARGS`` on WORLD_SIZE ranks under torchrun, one thread each; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
               test_file, "--worker", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def worker(base: Path, vq: Path, out: Path) -> None:
    """Runs on every rank under torchrun."""
    torch.set_num_threads(1)
    strategy = gloo_fsdp2_strategy

    def rank_loader():
        # Rank r reads samples r, r + 2, ...: each step's two micro-batches together are exactly the
        # single-process run's batch (Lightning's own sampler would shuffle them).
        samples = TextToImageSamples(SAMPLES, with_codes=True)
        sampler = DistributedSampler(samples, num_replicas=WORLD_SIZE, rank=int(os.environ["RANK"]), shuffle=False)
        return DataLoader(samples, batch_size=MICRO_BATCH, sampler=sampler)

    L.seed_everything(0)
    first = LossRecorder()
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=STEPS_BEFORE_SAVE)
    trainer = L.Trainer(devices=WORLD_SIZE, strategy=strategy(), callbacks=[first, checkpoint],
                        **trainer_kwargs(STEPS_BEFORE_SAVE))
    module = build_module(base, vq)
    trainer.fit(module, rank_loader())
    sharded_units = sum(1 for m in module.modules() if type(m).__name__.startswith("FSDP"))

    L.seed_everything(1)  # resuming must not depend on the seed the new process starts with
    resumed = LossRecorder()
    trainer = L.Trainer(devices=WORLD_SIZE, strategy=strategy(), callbacks=[resumed], enable_checkpointing=False,
                        **trainer_kwargs(TOTAL_STEPS))
    trainer.fit(build_module(base, vq), rank_loader(), ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    if trainer.is_global_zero:
        report = {"losses": first.losses + resumed.losses, "resumed_at": resumed.start_step,
                  "final_step": trainer.global_step, "sharded_units": sharded_units}
        (out / "report.json").write_text(json.dumps(report))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_processes_match_one_and_resume_from_distributed_checkpoint(tmp_path):
    base, vq = write_micro_base(tmp_path / "base"), write_small_vq(tmp_path / "vq")
    run_workers(__file__, base, vq, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir(), "ModelParallelStrategy should write a distributed (directory) checkpoint"
    from torch.distributed.checkpoint import FileSystemReader

    saved_keys = list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.model.stacked_ar.stack.") for k in saved_keys)
    assert not any(".stacked_ar.base." in k or k.startswith("state_dict.vq.") for k in saved_keys), \
        "frozen weights must not be written into the checkpoint"
    assert report["sharded_units"] > 5
    assert report["resumed_at"] == STEPS_BEFORE_SAVE and report["final_step"] == TOTAL_STEPS

    reference = run_single_process(base, vq)
    assert len(report["losses"]) == len(reference) == TOTAL_STEPS
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(reference), rtol=1e-4, atol=1e-5)
    assert reference[-1] < reference[0], "the losses should fall, or matching them proves little"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, type=Path, metavar=("BASE", "VQ", "OUT"), required=True)
    worker(*parser.parse_args().worker)
