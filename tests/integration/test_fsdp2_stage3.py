"""Stage 3 under FSDP2 (Lightning ``ModelParallelStrategy``): 2 CPU processes over gloo vs one process.

The test launches this file under torchrun; each rank trains on its half of every global batch (every DiT
block sharded, then the denoiser as root) and saves a distributed checkpoint. The losses must equal a
single-process run on the whole batches: every draw is seeded by the sample's key, not by the rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from stage2_fixtures import TextToImageSamples, loader, write_small_vq  # noqa: E402
from test_fsdp2 import LossRecorder, gloo_fsdp2_strategy, run_workers  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE, MICRO_BATCH, STEPS = 2, 2, 3
SAMPLES = STEPS * WORLD_SIZE * MICRO_BATCH


def build_module(vq: Path):
    from tests.unit.test_diffusion_decoder_module import make_module

    return make_module(vq, activation_checkpointing=True)


def trainer_kwargs() -> dict:
    return dict(accelerator="cpu", max_steps=STEPS, precision="32-true", logger=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0)


def worker(vq: Path, out: Path) -> None:
    torch.set_num_threads(1)
    samples = TextToImageSamples(SAMPLES)
    sampler = DistributedSampler(samples, num_replicas=WORLD_SIZE, rank=int(os.environ["RANK"]), shuffle=False)
    strategy = gloo_fsdp2_strategy()
    recorder = LossRecorder()
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=STEPS)
    trainer = L.Trainer(devices=WORLD_SIZE, strategy=strategy, callbacks=[recorder, checkpoint], **trainer_kwargs())
    module = build_module(vq)
    L.seed_everything(0)
    trainer.fit(module, DataLoader(samples, batch_size=MICRO_BATCH, sampler=sampler))
    sharded = sum(1 for m in module.modules() if type(m).__name__.startswith("FSDP"))
    if trainer.is_global_zero:
        (out / "report.json").write_text(json.dumps({"losses": recorder.losses, "sharded_units": sharded}))


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tmp_path):
    vq = write_small_vq(tmp_path / "vq")
    run_workers(__file__, vq, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(tmp_path / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.decoder.denoiser.transformer.layers.") for k in keys)
    assert not any(k.startswith(("state_dict.vq.", "state_dict.decoder.text_encoder.")) for k in keys)
    # 1 layer + 1 noise refiner + 1 context refiner, then the root
    assert report["sharded_units"] == 4

    recorder = LossRecorder()
    L.seed_everything(0)
    trainer = L.Trainer(devices=1, enable_checkpointing=False, callbacks=[recorder], **trainer_kwargs())
    trainer.fit(build_module(vq), loader(SAMPLES, WORLD_SIZE * MICRO_BATCH))
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(recorder.losses), rtol=1e-4, atol=1e-5)
    assert recorder.losses[-1] != recorder.losses[0]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("VQ", "OUT"), required=True)
    worker(*parser.parse_args().worker)
