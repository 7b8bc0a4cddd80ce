"""Evaluation jobs.

    python -m lit_star eval shapes --prompts P.jsonl --images DIR
    python -m lit_star eval understanding --base runs/shapes/stage0_base/hf --world runs/shapes_world
    python -m lit_star eval grid-probe --base runs/shapes/stage0_base/hf
    python -m lit_star eval prompt-probe --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt
    python -m lit_star eval code-loss --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \
        --shards 'runs/shapes_world/t2i_codes/val-*.tar'
    python -m lit_star eval binding --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \
        --shards 'runs/shapes_world/t2i_codes/val-*.tar'
"""

from lit_star.commands._dispatch import dispatch

EVALS = {
    "shapes": ("ShapesEval: GenEval-style and edit scoring by colour segmentation (--ckpt: generate first).", "lit_star.eval.shapes_eval:main"),
    "understanding": ("VQA and riddle accuracy of a base VLM or of the frozen base in a stage 2 checkpoint.", "lit_star.eval.understanding:main"),
    "grid-probe": ("Whether a base VLM's image tokens carry their grid row and column (linear probe per layer).", "lit_star.eval.grid_probe:main"),
    "prompt-probe": ("Where a stage 2 model keeps the prompt's colour and shape (nearest-centroid probe).", "lit_star.eval.prompt_probe:main"),
    "code-loss": ("A stage 2 model's image-token loss, with and without the prompt, by image region.", "lit_star.eval.code_loss:main"),
    "binding": ("Whether a stage 2 model prefers an image's own colour/shape caption (likelihood classification).", "lit_star.eval.binding:main"),
}


def main(argv: list[str]) -> int:
    return dispatch("eval", EVALS, argv)
