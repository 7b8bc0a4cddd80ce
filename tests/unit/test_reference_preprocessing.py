"""Preprocessing that must match the reference (MM-MVR/STAR, NOTES section 2) in training and sampling alike."""

from __future__ import annotations

import inspect

from lit_star.commands.generate import generate
from lit_star.sampling.generations import write_generations
from lit_star.sampling.modes import REFERENCE_MAX_ANSWER_TOKENS, reason_then_generate


def test_reasoning_answer_budget_is_the_references_256_tokens_everywhere():
    assert REFERENCE_MAX_ANSWER_TOKENS == 256
    for entry in (reason_then_generate, write_generations, generate):
        assert inspect.signature(entry).parameters["max_answer_tokens"].default == 256, entry.__qualname__
