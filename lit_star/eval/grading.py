"""Grading of the base VLM's answers: exact match, and scene descriptions compared as sets of objects.

Used by stage 0's validation (:class:`~lit_star.modules.base_module.BaseVLMModule`) and by
``python -m lit_star eval understanding``, so both count the same answers right.
"""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    """Exact match up to case, surrounding whitespace, inner whitespace runs and a final full stop."""
    return " ".join(text.strip().lower().rstrip(".").split())


# The world's scene descriptions (``dpg_description``): "A <background> background with <o1>, <o2> and <o3>."
SCENE_DESCRIPTION = re.compile(r"^a (?P<background>.+?) background with (?P<objects>.+)$")


def descriptions_match(prediction: str, answer: str) -> bool:
    """Whether two scene descriptions name the same background and the same objects, in any order.

    The world lists objects in reading order, but a description that names the same objects in another
    order describes the same image (and worlds written before that convention listed them in placement
    order), so the objects are compared as a set.
    """
    prediction, answer = normalize_answer(prediction), normalize_answer(answer)
    if prediction == answer:
        return True
    found, expected = description_parts(prediction), description_parts(answer)
    if found is None or expected is None:
        return False
    return found[0] == expected[0] and sorted(found[1]) == sorted(expected[1])


def description_parts(text: str) -> tuple[str, list[str]] | None:
    """``(background, object phrases in the order named)`` of a scene description, or None if it is not one."""
    match = SCENE_DESCRIPTION.match(normalize_answer(text))
    if match is None:
        return None
    if match["objects"] == "nothing else":  # an empty scene
        return match["background"], []
    return match["background"], match["objects"].replace(" and ", ", ").split(", ")


def answer_is_correct(prediction: str, answer: str, qtype: str | None) -> bool:
    """Exact match, or for a ``caption`` question the same scene description (:func:`descriptions_match`)."""
    exact = normalize_answer(prediction) == normalize_answer(answer)
    return exact or (qtype == "caption" and descriptions_match(prediction, answer))
