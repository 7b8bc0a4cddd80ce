"""Stage 3 end to end on tiny models: a trained checkpoint drives `generate/edit --decoder diffusion` and `decode`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage2_fixtures import loader, write_micro_base, write_small_vq  # noqa: E402
from tests.unit.test_diffusion_decoder_module import make_module  # noqa: E402

from lit_star.models.stacked_ar import StackedAR, save_stacked_ar  # noqa: E402
from lit_star.models.vq import VQModel  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3_e2e")
    base_dir, vq_dir = write_micro_base(root / "base"), write_small_vq(root / "vq")
    from lit_star.models.base_vlm import load_base_vlm

    vq = VQModel.from_pretrained(vq_dir)
    torch.manual_seed(3)
    stack = StackedAR(load_base_vlm(base_dir), num_stack_layers=1, adapter_depth=2,
                      codebook_size=vq.config.codebook_size, codebook_dim=vq.config.codebook_embed_dim)
    save_stacked_ar(stack, root / "stage2", base_dir)
    vq.save_pretrained(root / "stage2" / "vq")
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=root / "stage3", save_last=True, save_top_k=0)])
    trainer.fit(make_module(vq_dir), loader(8, 4))
    return root


@pytest.mark.slow
def test_generate_and_edit_with_the_diffusion_decoder(runs, tmp_path):
    from lit_star.cli import main as cli

    common = ["--ckpt", str(runs / "stage2"), "--model.image_size", "16", "--sampler.top_k", "10",
              "--decoder.kind", "diffusion", "--decoder.ckpt", str(runs / "stage3" / "last.ckpt"), "--decoder.steps", "2"]
    assert cli(["generate", *common, "--prompt", "[a red circle, a blue square]", "--out", str(tmp_path / "gen"),
                "--decoder.size", "24"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["settings"]["decoder"] == "diffusion"
    assert rows[0]["settings"]["decoder_settings"]["steps"] == 2
    assert all(Image.open(tmp_path / "gen" / r["image"]).size == (24, 24) for r in rows)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert cli(["edit", *common, "--image", str(tmp_path / "in.png"), "--instruction", "make it blue",
                "--out", str(tmp_path / "edit")]) == 0
    edits = [json.loads(line) for line in (tmp_path / "edit" / "edits.jsonl").read_text().splitlines()]
    assert Image.open(tmp_path / "edit" / edits[0]["image"]).size == (16, 16)
    assert cli(["generate", *common, "--prompt", "x", "--decoder.size", "15",
                "--out", str(tmp_path / "bad")]) == 2  # not a multiple of the patch


@pytest.mark.slow
def test_decode_command_with_both_decoders_and_super_resolution(runs, tmp_path):
    from lit_star.cli import main as cli

    codes = np.random.default_rng(0).integers(0, 64, (3, 8, 8))
    np.save(tmp_path / "grid.npy", codes)
    assert cli(["decode", "--decoder", "vq", "--vq", str(runs / "vq"), "--codes", str(tmp_path / "grid.npy"),
                 "--out", str(tmp_path / "vq")]) == 0
    assert cli(["decode", "--decoder", "diffusion", "--ckpt", str(runs / "stage3" / "last.ckpt"), "--codes",
                 str(tmp_path / "grid.npy"), "--prompt", "a red circle", "--size", "64", "--steps", "2",
                 "--out", str(tmp_path / "sr")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "sr" / "decoded.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["size"] == 64
    assert Image.open(tmp_path / "sr" / rows[0]["image"]).size == (64, 64)
    assert Image.open(tmp_path / "vq" / "grid_000.png").size == (32, 32)
    assert cli(["decode", "--decoder", "diffusion", "--codes", str(tmp_path / "grid.npy"), "--out", str(tmp_path / "x")]) == 2
