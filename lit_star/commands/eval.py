"""Evaluation jobs: ``python -m lit_star eval shapes --prompts P.jsonl --images DIR``."""

from lit_star.commands._dispatch import dispatch

EVALS = {
    "shapes": ("ShapesEval: GenEval-style and edit scoring by colour segmentation.", "lit_star.eval.shapes_eval:main"),
}


def main(argv: list[str]) -> int:
    return dispatch("eval", EVALS, argv)
