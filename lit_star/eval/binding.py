"""Does a stage 2 model draw the colour and shape it is told? Likelihood classification of real images.

    python -m lit_star eval binding --ckpt runs/shapes_curriculum/stage2_stacked_ar/checkpoints/last.ckpt \\
        --shards 'runs/shapes_curriculum/world/t2i_codes/val-*.tar'

Every pre-tokenized one-object validation image whose caption is just its object ("a red circle") is
scored, teacher-forced, under ten captions that differ only in the colour ("a blue circle", ...) and five
that differ only in the shape. The image counts as bound when its own caption gives the lowest summed
image-token loss. A stack that reads its prompt where it draws must prefer the true caption; chance is 1/10
for colour and 1/5 for shape. Sampling cannot be more faithful than this.

Accuracies are also split by the object's row in the world's 3 x 3 grid: in raster order a bottom-row
object starts ~200 codes after the prompt, a top-row one a few dozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from lit_star.sampling.likelihood import per_code_losses
from lit_star.sampling.modes import Star
from lit_star.worlds.shapes.world import COLORS, SHAPES, noun_phrase

# (captions, codes of one image) -> summed image-token loss under each caption
CaptionScorer = Callable[[list[str], torch.Tensor], torch.Tensor]


def one_object_rows(batches: Iterable[Mapping]) -> list[tuple[dict, torch.Tensor]]:
    """(object metadata, codes) of every image whose caption names exactly its one object."""
    rows = []
    for batch in batches:
        for caption, meta, codes in zip(batch["caption"], batch["meta"], batch["codes"]):
            objects = meta.get("objects", [])
            if len(objects) == 1 and caption == noun_phrase(objects[0]["color"], objects[0]["shape"]):
                rows.append((objects[0], codes.long()))
    return rows


def star_scorer(star: Star) -> CaptionScorer:
    def score(captions: list[str], codes: torch.Tensor) -> torch.Tensor:
        repeated = codes.unsqueeze(0).expand(len(captions), *codes.shape)
        return per_code_losses(star, captions, repeated, unconditional=False).sum(dim=1)

    return score


def binding_accuracy(score: CaptionScorer, rows: list[tuple[dict, torch.Tensor]]) -> dict:
    """Colour and shape likelihood-classification accuracy over ``rows`` (see the module docstring)."""
    if not rows:
        raise ValueError("no one-object images to score (captions like 'a red circle' with one object in the metadata)")
    colours = list(COLORS)
    hits: dict[str, dict[int, list[int]]] = {"colour": {}, "shape": {}}
    for obj, codes in rows:
        candidates = {
            "colour": (obj["color"], {c: noun_phrase(c, obj["shape"]) for c in colours}),
            "shape": (obj["shape"], {s: noun_phrase(obj["color"], s) for s in SHAPES}),
        }
        # The true caption is in both sets; one forward per distinct caption.
        distinct = list(dict.fromkeys(c for _, captions in candidates.values() for c in captions.values()))
        loss_of = dict(zip(distinct, score(distinct, codes).tolist()))
        for attribute, (truth, captions) in candidates.items():
            best = min(captions, key=lambda choice: loss_of[captions[choice]])
            hits[attribute].setdefault(int(obj["cell"][0]), []).append(int(best == truth))
    results: dict = {"images": len(rows), "chance": {"colour": 1 / len(colours), "shape": 1 / len(SHAPES)}}
    for attribute, by_row in hits.items():
        every = [hit for row_hits in by_row.values() for hit in row_hits]
        results[attribute] = sum(every) / len(every)
        results[f"{attribute}_by_grid_row"] = {
            row: {"accuracy": sum(v) / len(v), "images": len(v)} for row, v in sorted(by_row.items())
        }
    return results


def format_binding(results: dict) -> str:
    lines = [f"{results['images']} one-object images; likelihood classification (chance: colour "
             f"{results['chance']['colour']:.2f}, shape {results['chance']['shape']:.2f})",
             f"{'':<10}{'all':>8}" + "".join(f"{'row ' + str(r):>10}" for r in results["colour_by_grid_row"])]
    for attribute in ("colour", "shape"):
        by_row = results[f"{attribute}_by_grid_row"]
        lines.append(f"{attribute:<10}{results[attribute]:>8.3f}"
                     + "".join(f"{v['accuracy']:>6.2f} ({v['images']})" for v in by_row.values()))
    return "\n".join(lines)
