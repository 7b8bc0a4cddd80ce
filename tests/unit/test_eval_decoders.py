"""`eval decoders` (Table 7a in small): VQ and diffusion decoders on ShapesEval's ground-truth codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage2_fixtures import loader, write_small_vq  # noqa: E402
from test_diffusion_decoder_module import make_module  # noqa: E402

from lit_star.worlds.shapes.generator import WorldConfig, generate_world  # noqa: E402


@pytest.mark.slow
def test_eval_decoders_scores_every_decoder_and_category(tmp_path):
    from lit_star.commands.eval import decoders

    tiny = dict(t2i_train=2, t2i_val=2, vqa_train=2, vqa_val=2, edit_train=2, edit_val=2, knowledge_train=2,
                knowledge_val=2)
    generate_world(tmp_path / "world", WorldConfig(seed=0, **tiny), progress=False)
    vq = write_small_vq(tmp_path / "vq")
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "stage3", save_last=True, save_top_k=0)])
    trainer.fit(make_module(vq), loader(4, 4))
    assert decoders(world=str(tmp_path / "world"), vq=str(vq), stage3=[str(tmp_path / "stage3" / "last.ckpt")],
                    limit=1, steps=2, out=str(tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["decoders"]) == {"vq", "diffusion"}
    for scores in results["decoders"].values():
        assert len(scores["categories"]) == 6 and 0.0 <= scores["overall"] <= 1.0
        assert scores["psnr"] > 0 and "frechet_random_conv" in scores
    assert len(list((tmp_path / "out" / "diffusion").glob("*.png"))) == 6

    # The notebook decodes the same codes with both decoders: every code cell must run on these tiny models.
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    notebook = json.loads((repo / "notebooks" / "diffusion_decoder.ipynb").read_text())
    source = "\n\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    env = {**os.environ, "LIT_STAR_WORLD": str(tmp_path / "world"), "LIT_STAR_VQ": str(vq), "OMP_NUM_THREADS": "1",
           "LIT_STAR_STAGE3": str(tmp_path / "stage3" / "last.ckpt"), "LIT_STAR_STEPS": "2",
           "LIT_STAR_OUT": str(tmp_path / "notebook"), "PYTHONPATH": str(repo)}
    cells = subprocess.run([sys.executable, "-c", source], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=300)
    assert cells.returncode == 0, cells.stderr[-3000:]
    assert "PSNR" in cells.stdout and "ShapesEval overall" in cells.stdout
    assert (tmp_path / "notebook" / "side_by_side.png").is_file()
