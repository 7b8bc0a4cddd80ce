"""Exact resume, end to end: a training process killed with SIGKILL mid-step, right after a checkpoint, and
resumed with ``--ckpt_path last`` ends with the same weights, optimizer state and buffers, bit for bit, as a
run that never stopped; for stages 0, 1 and 2, mid-epoch and at an epoch boundary, and for stage 2 under
2-process FSDP2. Plus checkpoint hygiene: a kill during a save, then a resume in a copied run directory.

    OMP_NUM_THREADS=1 python -m pytest tests/test_resume_kill.py -m slow -s    # prints each max abs difference

Every run has one uninterrupted reference per stage (module-scoped) to the same final step.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # resume_fixtures, stage2_fixtures

from resume_fixtures import (  # noqa: E402
    checkpoint_difference,
    fit_command,
    run_and_kill_at,
    run_to_end,
    write_config,
)
from stage2_fixtures import CAPTIONS, CODE_GRID, write_micro_base, write_small_vq  # noqa: E402

from lit_star.worlds.shapes.generator import WorldConfig, generate_world  # noqa: E402

pytestmark = pytest.mark.slow

TOTAL_STEPS = 6
# Every stage's tiny epoch is 4 batches: a kill after step 2 is mid-epoch, after step 4 at the boundary.
KILLS = {"mid-epoch": 2, "epoch boundary": 4}
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": TOTAL_STEPS,
           "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
           "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, WorldConfig(t2i_train=16, t2i_val=2, vqa_train=24, vqa_val=2, edit_train=2, edit_val=2,
                                     knowledge_train=8, knowledge_val=2, geneval_per_category=1,
                                     edit_eval_per_category=1, knowledge_eval_size=2, shard_size=8), progress=False)
    return root


def write_code_shards(root: Path, samples: int = 16, per_shard: int = 8) -> str:
    """Pre-tokenized text-to-image shards (what ``tokenize`` writes) for the small VQ of stage2_fixtures."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(samples // per_shard):
        with wds.TarWriter(str(root / f"train-{shard:06d}.tar")) as writer:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                codes = rng.integers(0, 64, (CODE_GRID, CODE_GRID), dtype=np.int16)
                buffer = __import__("io").BytesIO()
                np.save(buffer, codes)
                writer.write({"__key__": f"{index:06d}", "txt": CAPTIONS[index % len(CAPTIONS)].encode(),
                              "codes.npy": buffer.getvalue()})
    return str(root / "train-*.tar")


def stage0(world: Path, tmp: Path) -> dict:
    component = {"resolution": 64, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8}
    return {
        "model": {"class_path": "lit_star.modules.base_module.BaseVLMModule", "init_args": {
            "processor_dir": "${trainer.default_root_dir}/processor", "flavour": "micro", "tokenizer_vocab_size": 300,
            "processor_fit_batches": 2, "export_dir": None, "warmup_steps": 1}},
        "data": {"class_path": "lit_star.data.MixtureDataModule", "init_args": {
            "batches_per_epoch": 4, "weights": {"vqa": 0.75, "knowledge": 0.25},
            "components": {
                "vqa": {"class_path": "lit_star.data.VQADataModule",
                        "init_args": {"train_shards": f"{world}/vqa/train-*.tar", **component}},
                "knowledge": {"class_path": "lit_star.data.KnowledgeDataModule",
                              "init_args": {"train_shards": f"{world}/knowledge/train-*.tar",
                                            **{k: v for k, v in component.items() if k != "resolution"}}}}}},
    }


def stage1(world: Path, tmp: Path) -> dict:
    # One pass over 16 images in batches of 4 (the recipe's kind of epoch: no known length).
    return {
        "model": {"class_path": "lit_star.modules.vq_module.VQModule", "init_args": {
            "flavour": "tiny", "vq_overrides": {"local_encoder": True, "entropy_loss_ratio": 0.1,
                                                "codebook_l2_norm": True},
            "lr": 3.0e-3, "warmup_steps": 1, "log_images": 0}},
        "data": {"class_path": "lit_star.data.ImageTextDataModule", "init_args": {
            "train_shards": f"{world}/t2i/train-*.tar", "resolution": 64, "batch_size": 4, "num_workers": 1,
            "shuffle_buffer": 8, "drop_last": True}},
    }


def stage2(world: Path, tmp: Path) -> dict:
    base, vq = tmp / "base", tmp / "vq"
    if not base.exists():
        write_micro_base(base), write_small_vq(vq)
    shards = write_code_shards(tmp / "codes")
    return {
        "model": {"class_path": "lit_star.modules.stacked_ar_module.StackedARModule", "init_args": {
            "base_path": str(base), "vq_path": str(vq), "num_stack_layers": 1, "adapter_depth": 2,
            "loss_chunk_size": 48, "log_images": 0, "cfg_dropout": 0.5, "warmup_steps": 1}},
        "data": {"class_path": "lit_star.data.ImageTextDataModule", "init_args": {
            "train_shards": shards, "image_key": None, "meta_key": None, "codes_key": "codes.npy", "batch_size": 4,
            "num_workers": 1, "shuffle_buffer": 8}},
    }


STAGES = {"stage 0": stage0, "stage 1": stage1, "stage 2": stage2}


def recipe(stage: str, world: Path, tmp: Path, run_dir: Path, callbacks: list | None = None) -> str:
    config = STAGES[stage](world, tmp)
    config.update({"seed_everything": 0, "checkpoint": {"every_n_train_steps": 1},
                   "trainer": {**TRAINER, "default_root_dir": str(run_dir), "callbacks": callbacks or []}})
    return write_config(run_dir.parent / f"{run_dir.name}.yaml", config)


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def references(world, tmp_path_factory) -> dict:
    """Each stage's uninterrupted run, built on first use."""
    built: dict[str, dict] = {}

    def reference(stage: str) -> dict:
        if stage not in built:
            tmp = tmp_path_factory.mktemp(stage.replace(" ", ""))
            run_dir = tmp / "uninterrupted"
            run_to_end(fit_command(recipe(stage, world, tmp, run_dir)), tmp / "uninterrupted.log")
            built[stage] = {"tmp": tmp, "checkpoint": last_checkpoint(run_dir)}
        return built[stage]

    return reference


@pytest.mark.parametrize("kill", KILLS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_mid_step_and_resumed_ends_bit_identical(stage, kill, world, references):
    reference = references(stage)
    tmp, after_step = reference["tmp"], KILLS[kill]
    run_dir, marker = tmp / f"killed_after_{after_step}", tmp / f"held_after_{after_step}"
    hold = {"class_path": "resume_fixtures.HoldMidStep", "init_args": {"after_step": after_step, "marker": str(marker)}}
    config = recipe(stage, world, tmp, run_dir, [hold])
    run_and_kill_at(fit_command(config), marker, tmp / f"{run_dir.name}.log")
    assert last_checkpoint(run_dir)["global_step"] == after_step

    run_to_end(fit_command(config, extra=("--ckpt_path", "last")), tmp / f"{run_dir.name}_resumed.log")
    resumed = last_checkpoint(run_dir)
    assert resumed["global_step"] == TOTAL_STEPS
    difference = checkpoint_difference(resumed, reference["checkpoint"])
    print(f"\n{stage}, killed after step {after_step} ({kill}): max abs difference {difference}")
    assert difference == 0.0


FSDP2 = ["--trainer.devices", "2", "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
         "--trainer.strategy.process_group_backend", "gloo", "--trainer.strategy.save_distributed_checkpoint", "true",
         "--data.init_args.batch_size", "2"]  # 8 samples per rank: 4 batches per epoch, as in one process


def distributed_checkpoint(run_dir: Path) -> dict:
    """A distributed ``last.ckpt`` directory as one checkpoint dict (weights and optimizer gathered)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = run_dir / "checkpoints" / "last.ckpt"
    dcp_to_torch_save(directory, run_dir / "gathered.pt")
    sharded = torch.load(run_dir / "gathered.pt", weights_only=False)
    checkpoint = torch.load(directory / "meta.pt", weights_only=False)
    return {**checkpoint, "state_dict": sharded["state_dict"], "optimizer_states": [sharded["optimizer_0"]]}


@pytest.mark.distributed
def test_a_two_process_fsdp2_run_killed_mid_epoch_and_resumed_ends_bit_identical(world, tmp_path):
    uninterrupted, killed, marker = tmp_path / "uninterrupted", tmp_path / "killed", tmp_path / "held"
    run_to_end(fit_command(recipe("stage 2", world, tmp_path, uninterrupted), extra=tuple(FSDP2)),
               tmp_path / "uninterrupted.log")
    hold = {"class_path": "resume_fixtures.HoldMidStep", "init_args": {"after_step": 2, "marker": str(marker)}}
    config = recipe("stage 2", world, tmp_path, killed, [hold])
    run_and_kill_at(fit_command(config, extra=tuple(FSDP2)), marker, tmp_path / "killed.log")
    at_kill = distributed_checkpoint(killed)
    assert at_kill["global_step"] == 2 and len(at_kill["lit_star_resume"]["ranks"]) == 2, "each rank's position"
    run_to_end(fit_command(config, extra=(*FSDP2, "--ckpt_path", "last")), tmp_path / "resumed.log")
    resumed, reference = distributed_checkpoint(killed), distributed_checkpoint(uninterrupted)
    assert resumed["global_step"] == TOTAL_STEPS
    difference = checkpoint_difference(resumed, reference)
    print(f"\nstage 2, FSDP2 on 2 processes, killed after step 2 (mid-epoch): max abs difference {difference}")
    assert difference == 0.0


def test_a_kill_during_a_save_leaves_no_temporary_file_and_a_copied_run_keeps_its_own_last(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "held_in_save"
    hold = {"class_path": "resume_fixtures.HoldDuringSave", "init_args": {"at_step": 4, "marker": str(marker)}}
    config = write_config(tmp_path / "boring.yaml", {
        "model": {"class_path": "lightning.pytorch.demos.boring_classes.DemoModel"},
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        "checkpoint": {"every_n_train_steps": 2},
        "trainer": {**TRAINER, "default_root_dir": str(run_dir), "callbacks": [hold]},
    })
    run_and_kill_at(fit_command(config), marker, tmp_path / "killed.log")
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))
    assert leftovers and leftovers[0].startswith(".step00000004.ckpt."), "the kill should have hit the save"
    assert last_checkpoint(run_dir)["global_step"] == 2

    copy = tmp_path / "copied_run"
    shutil.copytree(run_dir, copy)
    run_to_end(fit_command(config, extra=("--trainer.default_root_dir", str(copy), "--ckpt_path", "last")),
               tmp_path / "resumed.log")
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt", "step00000006.ckpt"], names
    assert last_checkpoint(copy)["global_step"] == TOTAL_STEPS
    assert last_checkpoint(run_dir)["global_step"] == 2, "the original run directory is left alone"
