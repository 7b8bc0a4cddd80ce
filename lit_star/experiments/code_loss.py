"""Where a stage 2 model's image-token loss goes, by region of the Shapes world's images.

    python -m lit_star.experiments.code_loss --ckpt runs/shapes_curriculum/stage2_stacked_ar/checkpoints/last.ckpt \\
        --shards 'runs/shapes_curriculum/world/t2i_codes/val-*.tar' --limit 200

Every code of a pre-tokenized validation image is put in one region, from the scene metadata:

* ``object start``: the first code, in raster (generation) order, whose patch overlaps an object's box;
  the code where the model has to commit to that object's colour and shape;
* ``object``: the other codes overlapping an object's box;
* ``ring 1`` / ``ring 2``: background codes one / two patches away from an object's box;
* ``background``: the rest.

For each region it prints the mean cross-entropy with the prompt, without it (the reference's
unconditional CFG row), and their difference (what the prompt is worth there). Codes of a tokenizer
whose codes see beyond their own patch make the rings expensive: they announce an object before its
first pixel, which the model cannot know yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lit_star.commands.options import ModelOverrides, load_model
from lit_star.experiments import command_line, write_json
from lit_star.sampling.likelihood import per_code_losses
from lit_star.sampling.modes import Star

REGIONS = ("object start", "object", "ring 1", "ring 2", "background")


def code_regions(objects: Sequence[Mapping], grid: int, resolution: int) -> list[str]:
    """Region name of each of the ``grid x grid`` codes (raster order) of an image with these objects
    (scene metadata: ``bbox`` = x0, y0, x1, y1 in pixels of a ``resolution`` px image)."""
    patch = resolution / grid
    distance = np.full((grid, grid), np.inf)  # Chebyshev distance, in patches, to the nearest object box
    regions = np.full((grid, grid), "background", dtype=object)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        index = np.arange(grid)
        # First and last patch each box overlaps (a box ending on a patch border does not reach the next).
        r0, r1 = int(y0 // patch), int(np.ceil(y1 / patch)) - 1
        c0, c1 = int(x0 // patch), int(np.ceil(x1 / patch)) - 1
        dy = np.maximum(np.maximum(r0 - index, index - r1), 0)
        dx = np.maximum(np.maximum(c0 - index, index - c1), 0)
        distance = np.minimum(distance, np.maximum(dy[:, None], dx[None, :]))
        regions[r0 : r1 + 1, c0 : c1 + 1] = "object"
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        regions[int(y0 // patch), int(x0 // patch)] = "object start"
    regions[(regions == "background") & (distance == 1)] = "ring 1"
    regions[(regions == "background") & (distance == 2)] = "ring 2"
    return regions.reshape(-1).tolist()


def code_loss_by_region(star: Star, batches, limit: int | None = None) -> dict[str, dict]:
    """Mean loss with and without the prompt per region (see the module docstring) over ``batches`` of
    ``caption``, ``meta`` and ``codes`` (an ``ImageTextDataModule`` loader of pre-tokenized shards)."""
    factor = star.vq.config.downsample_factor
    sums = {region: torch.zeros(2, dtype=torch.float64) for region in REGIONS}
    counts = dict.fromkeys(REGIONS, 0)
    seen = 0
    for batch in batches:
        take = len(batch["caption"]) if limit is None else min(len(batch["caption"]), limit - seen)
        if take <= 0:
            break
        captions, codes, metas = batch["caption"][:take], batch["codes"][:take].long(), batch["meta"][:take]
        losses = torch.stack([per_code_losses(star, captions, codes, unconditional) for unconditional in (False, True)])
        grid = codes.shape[-1]
        for row, meta in enumerate(metas):  # boxes are in pixels of the tokenized image
            for position, region in enumerate(code_regions(meta["objects"], grid, grid * factor)):
                sums[region] += losses[:, row, position].double()
                counts[region] += 1
        seen += take
    if seen == 0:
        raise ValueError("no validation samples to score")
    results = {}
    for region in REGIONS:
        n = counts[region]
        conditional, unconditional = (sums[region] / max(n, 1)).tolist()
        results[region] = {"codes": n, "loss": conditional, "loss_unconditional": unconditional,
                           "prompt_gain": unconditional - conditional, "share_of_loss": float(sums[region][0])}
    total = sum(r["share_of_loss"] for r in results.values())
    for r in results.values():
        r["share_of_loss"] = r["share_of_loss"] / total if total else 0.0
    results["images"] = seen
    return results


def format_code_loss(results: dict) -> str:
    lines = [f"{'region':<14}{'codes':>8}{'loss':>8}{'no prompt':>11}{'gain':>8}{'share':>8}", "-" * 57]
    for region in REGIONS:
        r = results[region]
        lines.append(f"{region:<14}{r['codes']:>8}{r['loss']:>8.3f}{r['loss_unconditional']:>11.3f}"
                     f"{r['prompt_gain']:>8.3f}{r['share_of_loss']:>8.2f}")
    lines.append(f"{results['images']} images; loss in nats per code; share: of the summed loss with the prompt")
    return "\n".join(lines)


def run(ckpt: str, shards: str, limit: int = 200, batch_size: int = 25, out: str | None = None,
        model: ModelOverrides = ModelOverrides()) -> int:
    """Print (and optionally write) a stage 2 model's loss with and without the prompt, by image region.

    Args:
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar directory).
        shards: pre-tokenized Shapes validation shards (codes.npy + txt + json).
        limit: score the first N images.
        batch_size: images scored together.
        out: write the table to this JSON file.
        model: overrides of what the checkpoint records.
    """
    from lit_star.data import ImageTextDataModule

    star = load_model(ckpt, model)
    data = ImageTextDataModule(val_shards=shards, image_key=None, codes_key="codes.npy", batch_size=batch_size,
                               val_batch_size=batch_size, num_workers=0)
    data.setup("validate")
    results = code_loss_by_region(star, data.val_dataloader(), limit)
    print(format_code_loss(results))
    write_json(results, out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(command_line(run))
