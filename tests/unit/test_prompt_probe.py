"""The prompt probe: leave-one-out nearest-centroid accuracy and the positions it reads."""

from __future__ import annotations

import itertools

import pytest
import torch

from lit_star.worlds.shapes.world import COLORS, SHAPES, noun_phrase
from lit_star.experiments.prompt_probe import format_probe, nearest_centroid_accuracy, probe_prompt_states
from tests.stage2_fixtures import build_micro_star


def test_nearest_centroid_accuracy_separates_clusters_and_leaves_the_row_out():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    assert nearest_centroid_accuracy(separated, labels) == 1.0
    # Left out, each row's own class mean is its partner on the other axis: all wrong. With the row
    # kept in, both class means would tie.
    crossed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert nearest_centroid_accuracy(crossed, torch.tensor([0, 0, 1, 1])) == 0.0
    with pytest.raises(ValueError, match="at least two rows"):
        nearest_centroid_accuracy(separated[:4], torch.tensor([0, 0, 0, 1]))


def test_probe_reads_the_colour_word_and_the_first_code_position():
    corpus = [noun_phrase(c, s) for c, s in itertools.product(COLORS, SHAPES)] * 20
    results = probe_prompt_states(build_micro_star(corpus, codebook_size=16, codebook_dim=8, image_size=8, vocab_size=400))
    # Causal attention: at the colour word nothing depends on the shape that follows, so colour is read
    # perfectly and shape never: left out, a row is missing only from its own shape's centroid, which
    # makes that centroid the farthest one.
    assert results["base @ colour word"] == {"colour": 1.0, "shape": 0.0}
    assert results["stack @ colour word"]["colour"] == 1.0
    assert results["base @ shape word"]["shape"] > 0.9
    assert set(results) == {f"{part} @ {where}" for part in ("base", "stack")
                            for where in ("colour word", "shape word", "first code")}
    assert "chance: colour 0.10, shape 0.20" in format_probe(results)
