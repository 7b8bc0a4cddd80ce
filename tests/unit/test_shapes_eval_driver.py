"""ShapesEval's drivers: seen and held-out side by side, the checkpoint's reasoning suffix, a VQ's reconstructions.

Plumbing only (micro models draw noise); the scorer itself is tested in test_shapes_eval.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_star.checkpoints import REFERENCE_REASONING_SUFFIX, load_vq
from lit_star.cli import main as cli
from lit_star.eval.shapes import evaluate_on_shapes, format_headline, grid_prompts_path
from lit_star.eval.vq_shapes import vq_reconstruction_eval
from lit_star.sampling.filtering import SamplerConfig
from lit_star.sampling.loading import load_star
from lit_star.worlds.shapes.generator import WorldConfig, generate_world
from tests.stage2_fixtures import write_micro_base, write_small_vq

SAMPLER = SamplerConfig(greedy=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("driver")
    world = root / "world"
    tiny = dict(t2i_train=1, t2i_val=1, vqa_train=1, vqa_val=1, edit_train=1, edit_val=1, knowledge_train=1,
                knowledge_val=1, geneval_per_category=1, geneval_seen_per_category=1, geneval_seen_dev_per_category=1,
                edit_eval_per_category=1, knowledge_eval_size=4)
    generate_world(world, WorldConfig(**tiny), progress=False)
    return root, world, write_micro_base(root / "base"), write_small_vq(root / "vq")


def _checkpoint(root: Path, base: Path, vq: Path, name: str, **module_args) -> Path:
    from lit_star.modules.stacked_ar_module import StackedARModule

    module = StackedARModule(base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2, **module_args)
    module.configure_model()
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                  "frozen_checksums": module.frozen_checksums, "datamodule_hyper_parameters": {"resolution": 32}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, root / name)
    return root / name


def test_the_reasoning_suffix_is_recorded_with_the_checkpoint(dirs):
    root, _, base, vq = dirs
    shapes = _checkpoint(root, base, vq, "shapes.ckpt", reasoning_suffix="")
    assert torch.load(shapes, weights_only=False)["stacked_ar_config"]["reasoning_suffix"] == ""
    assert load_star(shapes).reasoning_suffix == ""
    assert load_star(_checkpoint(root, base, vq, "default.ckpt")).reasoning_suffix == REFERENCE_REASONING_SUFFIX
    older = torch.load(shapes, weights_only=False)
    del older["stacked_ar_config"]["reasoning_suffix"]  # written before the field existed
    torch.save(older, root / "older.ckpt")
    assert load_star(root / "older.ckpt").reasoning_suffix == REFERENCE_REASONING_SUFFIX


def test_the_shapes_recipe_records_an_empty_suffix():
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes/shapes/stage2_stacked_ar.yaml").read_text())
    assert recipe["model"]["init_args"]["reasoning_suffix"] == ""


def test_seen_and_held_out_are_scored_side_by_side_with_the_recorded_suffix(dirs, tmp_path):
    root, world, base, vq = dirs
    star = load_star(_checkpoint(root, base, vq, "eval.ckpt", reasoning_suffix=""))
    results = evaluate_on_shapes(star, world, tmp_path, SAMPLER, batch_size=6, knowledge=True, per_category=1,
                                 development=True, log=lambda *_: None)
    assert set(results["headline"]) == {"seen", "held_out"}
    for name, key in (("seen", "geneval_seen"), ("held_out", "geneval")):
        assert results["headline"][name] == {"overall": results[key]["overall"],
                                             "standard_error": results[key]["overall_standard_error"]}
        assert sum(results[key]["counts"].values()) == 6 and set(results[key]["objects_per_image"]) == set(
            results[key]["categories"])
    assert "geneval_seen_dev" in results and (tmp_path / "geneval_seen_dev").is_dir()
    assert results["reasoning_suffix"] == ""
    reasoned = [json.loads(line) for line in (tmp_path / "knowledge_reasoning/generations.jsonl").read_text().splitlines()]
    assert reasoned and all(r["settings"]["reasoning_suffix"] == "" for r in reasoned)
    assert all(r["generation_prompt"] == (r["answer"] or r["prompt"]) for r in reasoned)
    assert format_headline(results["headline"]).startswith("ShapesEval: seen ")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["headline"] == results["headline"]
    # every grid is labelled: its tiles' prompts, row by row, in a file beside it
    records = [json.loads(line) for line in (world / "eval/geneval_seen.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["category"] == "colors")
    assert grid_prompts_path(tmp_path / "grids/geneval_seen_colors.png").read_text().splitlines() == [first["prompt"]]
    assert all(grid_prompts_path(grid).is_file() for grid in results["grids"])


def test_a_world_without_the_seen_set_is_named(dirs, tmp_path, capsys):
    root, world, base, vq = dirs
    ckpt = _checkpoint(root, base, vq, "old_world.ckpt")
    star = load_star(ckpt)
    old = tmp_path / "old_world"
    (old / "eval").mkdir(parents=True)
    (old / "eval/geneval.jsonl").write_text((world / "eval/geneval.jsonl").read_text())
    with pytest.raises(FileNotFoundError, match="geneval_seen.jsonl does not exist"):
        evaluate_on_shapes(star, old, tmp_path / "out", SAMPLER, knowledge=False, log=lambda *_: None)
    assert evaluate_on_shapes(star, old, tmp_path / "out", SAMPLER, knowledge=False, seen=False, per_category=1,
                              log=lambda *_: None)["headline"].keys() == {"held_out"}
    assert cli(["eval", "shapes", "--ckpt", str(ckpt), "--world", str(old), "--out", str(tmp_path / "cli"),
                "--knowledge", "false"]) == 2
    assert "geneval_seen.jsonl does not exist" in capsys.readouterr().err


def test_vq_reconstructions_are_scored_with_psnr_and_usage_beside(dirs, tmp_path, capsys):
    _, world, _, vq = dirs
    # the job: exit 1 when the target is not met (an untrained VQ), 2 with a bad world
    rc = cli(["eval", "shapes", "--vq", str(vq), "--world", str(world), "--per_category", "1", "--out", str(tmp_path)])
    assert "PSNR" in capsys.readouterr().out
    result = json.loads((tmp_path / "vq_results.json").read_text())
    assert rc == (0 if result["meets_target"] else 1)
    assert not result["meets_target"]  # untrained: the gate below must be the flag's doing
    assert cli(["eval", "shapes", "--vq", str(vq), "--world", str(world), "--per_category", "1",
                "--fail_below_target", "false"]) == 0  # the curriculum's report step: scores only
    assert set(result["sets"]) == {"geneval", "geneval_seen", "knowledge", "edit"}
    assert sum(result["sets"]["geneval"]["counts"].values()) == 6 and len(result["sets"]["knowledge"]["counts"]) == 4
    assert 0.0 <= result["lowest_category"] <= 1.0 and result["meets_target"] == (result["lowest_category"] >= 0.98)
    assert result["psnr"] > 0 and 0 < result["utilisation"] <= 1 and result["perplexity"] >= 1
    assert len(list((tmp_path / "vq_reconstructions/geneval_seen").glob("*.png"))) == 6
    assert cli(["eval", "shapes", "--vq", str(vq), "--world", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/eval/geneval.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown set"):
        vq_reconstruction_eval(load_vq(vq), world, sets=("geneval", "dpg"))
