"""Stage 4 under FSDP2 (Lightning ``ModelParallelStrategy``): 2 CPU processes over gloo vs one process.

The test launches this file under torchrun; each rank trains a tiny ``UnifiedTuneModule`` on its half of every
global batch (text-to-image, then edit, then text-to-image: the edit step runs the sharded ViT) with
``lit_star.distributed.unified``'s plan, and saves a distributed checkpoint at the last step. The losses and the
trained weights must equal a single-process run on the whole batches: every draw is seeded by the sample's key,
not by the rank, and each rank's loss is a mean over equally many code tokens and samples.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tests.integration.test_fsdp2 import LossRecorder, gloo_fsdp2_strategy, run_workers
from tests.stage2_fixtures import CAPTIONS, IMAGE_SIZE, write_micro_base, write_small_vq

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE, MICRO_BATCH, STEPS = 2, 2, 3
GLOBAL_BATCH = WORLD_SIZE * MICRO_BATCH
SAMPLES = STEPS * GLOBAL_BATCH
LEARNING_RATE = 1e-3
# AdamW moves a weight by about the learning rate per step whatever its gradient, so an element whose gradient is
# near zero can step differently when the two runs sum in another order (seen: 1 of 4096 DiT weights, 3e-5 off);
# a tenth of one step still fails a wrong gradient, which is off by whole steps.
WEIGHT_TOLERANCE = 0.1 * LEARNING_RATE
INSTRUCTIONS = ["make the circle red", "remove the square", "add a triangle", "make it blue"]


class TextToImageAndEditSamples(Dataset):
    """Deterministic samples whose kind follows their global batch (odd batches are edits), so every rank's
    micro-batch of a step is of the step's one kind, as a ``MixtureDataModule`` batch is."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        key = f"sample{index:05d}"

        def image() -> torch.Tensor:
            return torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1

        if (index // GLOBAL_BATCH) % 2:
            return {"instruction": INSTRUCTIONS[index % len(INSTRUCTIONS)], "source_image": image(),
                    "target_image": image(), "__key__": key}
        return {"caption": CAPTIONS[index % len(CAPTIONS)], "image": image(), "__key__": key}


def build_module(base: Path, vq: Path):
    from lit_star.modules.diffusion_decoder_module import DiffusionDecoderModule
    from lit_star.modules.stacked_ar_module import StackedARModule
    from lit_star.modules.unified_tune_module import UnifiedTuneModule
    from tests.unit.test_diffusion_decoder_module import TINY_DIT

    stack = StackedARModule(base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2,
                            loss_chunk_size=48, log_images=0)
    decoder = DiffusionDecoderModule(vq_path=str(vq), transformer=TINY_DIT, pixel_space=True,
                                     tiny_text_encoder={"hidden_size": 16, "num_layers": 2}, max_caption_tokens=16,
                                     system_prompt=None, activation_checkpointing=True)
    return UnifiedTuneModule(stack, decoder, flow_loss_weight=0.5, stack_learning_rate=LEARNING_RATE,
                             decoder_learning_rate=LEARNING_RATE)


def trainer_kwargs() -> dict:
    return dict(accelerator="cpu", max_steps=STEPS, precision="32-true", logger=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0)


def trainable_weights(module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters; under FSDP2 a collective, so every rank calls it."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in module.named_parameters() if p.requires_grad}


def frozen_weights(module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in module.named_parameters() if not p.requires_grad}


def is_sharded(module) -> bool:
    return type(module).__name__.startswith("FSDP")


def sharding_report(module) -> dict:
    """Which parts the plan made FSDP2 units: the stack's and the DiT's, counted apart, and what stayed whole."""
    ar, decoder = module.autoregressive, module.diffusion.decoder
    dit = decoder.transformer
    return {
        "stack_units": sum(map(is_sharded, ar.modules())),
        "dit_units": sum(map(is_sharded, module.diffusion.modules())),
        "stack_root": is_sharded(ar.model),
        "stack_parts": [is_sharded(m) for m in (*ar.stacked_ar.stack.layers, ar.stacked_ar.stack,
                                                 ar.stacked_ar.adapter, ar.stacked_ar.pixel_head)],
        "dit_root": is_sharded(decoder.denoiser),
        "dit_blocks": [is_sharded(m) for m in (*dit.context_refiner, *dit.noise_refiner, *dit.layers)],
        # shared by both models and never trained: outside both plans
        "vq_sharded": any(map(is_sharded, ar.vq.modules())),
    }


def worker(base: Path, vq: Path, out: Path) -> None:
    torch.set_num_threads(1)
    samples = TextToImageAndEditSamples()
    # Rank r reads samples r, r + 2, ...: a step's two micro-batches together are the single-process batch.
    sampler = DistributedSampler(samples, num_replicas=WORLD_SIZE, rank=int(os.environ["RANK"]), shuffle=False)
    strategy = gloo_fsdp2_strategy()
    recorder = LossRecorder()
    # The save at the last step runs both models' frozen-weight checks (gathering the sharded base).
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=STEPS)
    trainer = L.Trainer(devices=WORLD_SIZE, strategy=strategy, callbacks=[recorder, checkpoint], **trainer_kwargs())
    module = build_module(base, vq)
    L.seed_everything(0)
    trainer.fit(module, DataLoader(samples, batch_size=MICRO_BATCH, sampler=sampler))
    trained, frozen = trainable_weights(module), frozen_weights(module)
    if trainer.is_global_zero:
        torch.save({"trainable": trained, "frozen": frozen}, out / "weights.pt")
        report = {"losses": recorder.losses, **sharding_report(module)}
        (out / "report.json").write_text(json.dumps(report))


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_stage4_two_processes_match_one(tmp_path):
    base, vq = write_micro_base(tmp_path / "base"), write_small_vq(tmp_path / "vq")
    run_workers(__file__, base, vq, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    sharded = torch.load(tmp_path / "weights.pt", weights_only=True)

    # The plan: both models are FSDP2 roots with their own units; the shared VQ is in neither.
    assert report["stack_root"] and all(report["stack_parts"]), report
    assert report["dit_root"] and all(report["dit_blocks"]) and len(report["dit_blocks"]) == 3, report
    assert report["stack_units"] > 5 and report["dit_units"] == 4, report  # 1 + 1 + 1 DiT blocks + the denoiser
    assert not report["vq_sharded"]
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(tmp_path / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.autoregressive.model.stacked_ar.stack.") for k in keys)
    assert any(k.startswith("state_dict.diffusion.decoder.denoiser.transformer.layers.") for k in keys)
    frozen_in_checkpoint = [k for k in keys if k.startswith("state_dict.")
                            and not k.startswith(("state_dict.autoregressive.model.stacked_ar.",
                                                  "state_dict.diffusion.decoder.denoiser."))]
    frozen_in_checkpoint += [k for k in keys if ".stacked_ar.base." in k]
    assert not frozen_in_checkpoint, f"frozen weights written into the checkpoint: {frozen_in_checkpoint[:5]}"

    recorder = LossRecorder()
    L.seed_everything(0)
    trainer = L.Trainer(devices=1, enable_checkpointing=False, callbacks=[recorder], **trainer_kwargs())
    module = build_module(base, vq)
    module.configure_model()
    initial_frozen = frozen_weights(module)
    trainer.fit(module, DataLoader(TextToImageAndEditSamples(), batch_size=GLOBAL_BATCH, shuffle=False))

    assert len(report["losses"]) == len(recorder.losses) == STEPS
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(recorder.losses), rtol=1e-4, atol=1e-5)
    single = trainable_weights(module)
    assert sharded["trainable"].keys() == single.keys()
    assert any(k.startswith("autoregressive.") for k in single) and any(k.startswith("diffusion.") for k in single)
    for name, weight in single.items():
        torch.testing.assert_close(sharded["trainable"][name], weight, rtol=0, atol=WEIGHT_TOLERANCE, msg=name)
    # Training moved both models (or matching them proves little) and no frozen weight, on either run.
    initial = build_module(base, vq)
    L.seed_everything(0)  # the initialisation both runs started from
    initial.configure_model()
    moved = {name.split(".")[0] for name, w in trainable_weights(initial).items()
             if float((w - single[name]).abs().max()) > 10 * WEIGHT_TOLERANCE}
    assert moved == {"autoregressive", "diffusion"}
    assert sharded["frozen"].keys() == initial_frozen.keys()
    for name, weight in initial_frozen.items():
        assert torch.equal(sharded["frozen"][name], weight), f"frozen {name} changed under FSDP2"
        assert torch.equal(dict(module.named_parameters())[name], weight), f"frozen {name} changed"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, type=Path, metavar=("BASE", "VQ", "OUT"), required=True)
    worker(*parser.parse_args().worker)
