"""Judging a VQ by what the stack needs: ShapesEval of its reconstructions of the world's ground truth.

    python -m lit_star eval shapes --vq runs/shapes/stage1_vq/checkpoints/last.ckpt --world runs/shapes_world --out runs/vq_eval

Every ground-truth image of the world's eval sets is encoded to codes and decoded again, and the
reconstructions are scored against the prompts they were drawn for. A stack can at best draw what the VQ
decodes, so a VQ is good enough when every category scores at least :data:`TARGET` (0.98). PSNR against
the ground truth, codebook utilisation and code perplexity are reported beside it, not as targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from lit_star.data.images import rgb_to_tensor
from lit_star.eval.shapes import limit_per_category
from lit_star.eval.vq_metrics import CodebookUsage
from lit_star.models.vq import VQModel
from lit_star.sampling.modes import codes_to_images
from lit_star.worlds.shapes.scorer import format_table, load_prompts, score_edits, score_geneval

TARGET = 0.98
# set name -> (prompts file, ground-truth folder) under the world's eval/
VQ_SETS = {
    "geneval": ("geneval.jsonl", "geneval_gt"),
    "geneval_seen": ("geneval_seen.jsonl", "geneval_seen_gt"),
    "knowledge": ("knowledge.jsonl", "knowledge_gt"),
    "edit": ("edit.jsonl", "edit_gt"),
}


@torch.no_grad()
def reconstruct(vq: VQModel, images: list) -> tuple[list, torch.Tensor]:
    """(reconstructed PIL images, B x h x w codes) of RGB PIL ``images`` through ``vq``."""
    parameter = next(vq.parameters())
    batch = torch.stack([rgb_to_tensor(image.convert("RGB")) for image in images]).to(parameter.device, parameter.dtype)
    codes = vq.encode_to_codes(batch)
    return codes_to_images(vq, codes), codes


def vq_reconstruction_eval(vq: VQModel, world: str | Path, out: str | Path | None = None,
                           sets: tuple[str, ...] = tuple(VQ_SETS), batch_size: int = 32,
                           per_category: int | None = None, log=print) -> dict:
    """ShapesEval of ``vq``'s reconstructions of the ground truth of ``world``'s eval ``sets`` (the first
    ``per_category`` records of each category when given), with PSNR, codebook utilisation and perplexity beside it.
    Writes the reconstructions and ``vq_results.json`` under ``out`` when given."""
    eval_dir = Path(world) / "eval"
    unknown = [s for s in sets if s not in VQ_SETS]
    if unknown:
        raise ValueError(f"unknown set(s) {unknown}; known: {list(VQ_SETS)}")
    usage = CodebookUsage(vq.config.codebook_size)
    squared_error = pixels = 0.0
    results: dict = {"target": TARGET, "sets": {}}
    for name in sets:
        prompts_file, gt_folder = VQ_SETS[name]
        if not (eval_dir / prompts_file).is_file():
            raise FileNotFoundError(f"{eval_dir / prompts_file} does not exist: generate the world (python -m lit_star "
                                    "data shapes), or leave the set out")
        records = limit_per_category(load_prompts(eval_dir / prompts_file), per_category)
        reconstructions = {}
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            paths = [eval_dir / gt_folder / f"{r['id']}.png" for r in batch]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"ground-truth image {missing[0]} is missing")
            originals = [Image.open(p).convert("RGB") for p in paths]
            images, codes = reconstruct(vq, originals)
            usage.update(codes.cpu())
            for record, original, image in zip(batch, originals, images):
                reconstructions[record["id"]] = image
                difference = (rgb_to_tensor(image) - rgb_to_tensor(original)) / 2  # [0, 1] scale
                squared_error += float((difference ** 2).sum())
                pixels += difference.numel()
        if out is not None:
            folder = Path(out) / "vq_reconstructions" / name
            folder.mkdir(parents=True, exist_ok=True)
            for image_id, image in reconstructions.items():
                image.save(folder / f"{image_id}.png")
        scored = (score_edits if name == "edit" else score_geneval)(records, reconstructions)
        results["sets"][name] = scored
        log(f"VQ reconstructions, {name}:\n" + format_table(scored))
    lowest = min(min(r["categories"].values()) for r in results["sets"].values())
    mse = squared_error / max(pixels, 1)
    code_usage = usage.compute()
    results.update({
        "lowest_category": lowest,
        "meets_target": lowest >= TARGET,
        "psnr": float("inf") if mse == 0 else float(-10 * torch.log10(torch.tensor(mse))),
        "utilisation": float(code_usage["utilisation"]),
        "perplexity": float(code_usage["perplexity"]),
    })
    log(f"VQ judged by ShapesEval of its reconstructions: lowest category {lowest:.3f} (target >= {TARGET}; "
        f"{'met' if results['meets_target'] else 'NOT met'}); beside it PSNR {results['psnr']:.2f} dB, "
        f"codebook utilisation {results['utilisation']:.4f}, perplexity {results['perplexity']:.1f}")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in results.items() if k != "sets"}
        summary["sets"] = {k: {key: v[key] for key in ("overall", "overall_standard_error", "categories", "counts")}
                           for k, v in results["sets"].items()}
        (Path(out) / "vq_results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return results
