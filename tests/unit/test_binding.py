"""eval binding: likelihood classification of one-object images by their colour and shape words."""

from __future__ import annotations

import pytest
import torch

from lit_star.worlds.shapes.world import COLORS, SHAPES, noun_phrase
from lit_star.eval.binding import binding_accuracy, format_binding, one_object_rows, star_scorer
from tests.stage2_fixtures import build_micro_star


def _row(color: str, shape: str, grid_row: int, image_id: int = 0) -> tuple[dict, torch.Tensor]:
    return {"color": color, "shape": shape, "cell": [grid_row, 1]}, torch.full((4, 4), image_id, dtype=torch.long)


def _scorer_preferring(color: str | None = None, truth: dict | None = None):
    """A fake model: loss 0 for the caption it prefers, 1 for every other."""

    def score(captions, codes):
        if truth is not None:
            wanted = noun_phrase(truth["color"], truth["shape"])
            return torch.tensor([0.0 if c == wanted else 1.0 for c in captions])
        return torch.tensor([0.0 if f" {color} " in f" {c} " else 1.0 for c in captions])

    return score


def test_a_model_that_reads_the_prompt_scores_one_and_a_fixed_colour_scores_its_share():
    rows = [_row("red", "circle", 0, 0), _row("blue", "star", 2, 1), _row("red", "hexagon", 2, 2),
            _row("green", "square", 1, 3)]

    def truthful(captions, codes):  # the image's codes say which image it is
        return _scorer_preferring(truth=rows[int(codes[0, 0])][0])(captions, codes)

    results = binding_accuracy(truthful, rows)
    assert results["colour"] == 1.0 and results["shape"] == 1.0 and results["images"] == 4
    always_red = binding_accuracy(_scorer_preferring("red"), rows)
    assert always_red["colour"] == 0.5
    assert always_red["colour_by_grid_row"] == {0: {"accuracy": 1.0, "images": 1}, 1: {"accuracy": 0.0, "images": 1},
                                               2: {"accuracy": 0.5, "images": 2}}
    assert "row 2" in format_binding(always_red)


def test_only_captions_naming_their_one_object_are_kept():
    meta = lambda *objs: {"objects": [{"color": c, "shape": s, "cell": [0, 0]} for c, s in objs]}  # noqa: E731
    codes = torch.zeros(3, 4, 4)
    batch = {"caption": ["a red circle", "two red circles", "an orange star"],
             "meta": [meta(("red", "circle")), meta(("red", "circle"), ("red", "circle")), meta(("orange", "star"))],
             "codes": codes}
    kept = one_object_rows([batch])
    assert [obj["shape"] for obj, _ in kept] == ["circle", "star"]
    with pytest.raises(ValueError, match="no one-object images"):
        binding_accuracy(_scorer_preferring("red"), [])


def test_star_scorer_sums_the_teacher_forced_losses_per_caption():
    captions = [noun_phrase(c, s) for c in COLORS for s in SHAPES]
    star = build_micro_star(captions, codebook_size=16, codebook_dim=8, image_size=8)
    codes = torch.randint(0, 16, (4, 4), generator=torch.Generator().manual_seed(0))
    losses = star_scorer(star)(["a red circle", "a blue circle"], codes)
    assert losses.shape == (2,) and torch.isfinite(losses).all() and losses[0] != losses[1]
    results = binding_accuracy(star_scorer(star), [({"color": "red", "shape": "circle", "cell": [1, 1]}, codes)])
    assert results["colour"] in (0.0, 1.0) and results["shape"] in (0.0, 1.0)
