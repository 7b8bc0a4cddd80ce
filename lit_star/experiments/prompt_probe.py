"""Where does a stage 2 model keep the prompt? A nearest-centroid probe over the Shapes vocabulary.

    python -m lit_star.experiments.prompt_probe --ckpt runs/shapes_curriculum/stage2_stacked_ar/checkpoints/last.ckpt

The prompts are "a <colour> <shape>" for every colour and shape of the world (50 prompts). For the
frozen base's final (post-norm) states and for the stack's output, at the colour word, the shape word
and the position that predicts the first image code, it reports how often the prompt's colour and
shape are recovered by leave-one-out nearest-centroid classification (cosine). A stack that draws what
it is told must carry colour and shape to the positions where it draws; chance is 1/10 for colour and
1/5 for shape.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from lit_star.commands.options import ModelOverrides, load_model
from lit_star.experiments import command_line, write_json
from lit_star.sampling.modes import Star, text_to_image_prefix
from lit_star.worlds.shapes.world import COLORS, SHAPES, noun_phrase

# Tokens after the user text in a text-to-image prefix: <|im_end|> \n <|im_start|> assistant \n <|vision_start|>.
_TOKENS_AFTER_PROMPT = 6


def nearest_centroid_accuracy(states: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out accuracy of classifying each row by the closest class mean of the other rows (cosine)."""
    states = F.normalize(states.double(), dim=-1)
    classes = int(labels.max()) + 1
    sums = torch.zeros(classes, states.shape[1], dtype=states.dtype).index_add_(0, labels, states)
    counts = torch.bincount(labels, minlength=classes).to(states.dtype)
    if int(counts.min()) < 2:
        raise ValueError("every class needs at least two rows for a leave-one-out probe")
    correct = 0
    for row, label in zip(states, labels):
        centroids = sums.clone()
        centroids[label] -= row
        means = centroids / (counts - F.one_hot(label, classes).to(states.dtype)).unsqueeze(1)
        correct += int((F.normalize(means, dim=-1) @ row).argmax() == label)
    return correct / len(labels)


def _single_token(tokenizer, word: str) -> None:
    pieces = tokenizer.tokenize(f" {word}")
    if len(pieces) != 1:
        raise ValueError(f"the probe reads one position per word, but {word!r} is {len(pieces)} tokens: {pieces}")


@torch.no_grad()
def probe_prompt_states(star: Star) -> dict:
    """Colour and shape probe accuracies per (model part, position); see the module docstring."""
    tokenizer = star.processor.tokenizer
    for word in (*COLORS, *SHAPES):
        _single_token(tokenizer, word)
    pairs = list(itertools.product(COLORS, SHAPES))
    prompts = [noun_phrase(color, shape) for color, shape in pairs]
    prefix = text_to_image_prefix(star.layout, prompts, guided=False).to(star.device)
    model = star.model
    embeds = model.embed_inputs(prefix.input_ids, prefix.code_mask, star.codebook(prefix.code_ids))
    base_states = model.base_decoder(
        inputs_embeds=embeds.to(model.base.dtype), position_ids=prefix.position_ids, attention_mask=prefix.attention_mask,
    ).last_hidden_state
    stack_states = model(embeds.to(model.base.dtype), prefix.position_ids, prefix.attention_mask)
    # Rows are left-padded, so a position counted from the end is the same word in every row.
    positions = {"colour word": -_TOKENS_AFTER_PROMPT - 2, "shape word": -_TOKENS_AFTER_PROMPT - 1, "first code": -1}
    colour_labels = torch.tensor([list(COLORS).index(color) for color, _ in pairs])
    shape_labels = torch.tensor([SHAPES.index(shape) for _, shape in pairs])
    results = {}
    for part, states in (("base", base_states), ("stack", stack_states)):
        for where, index in positions.items():
            row = states[:, index].float().cpu()
            results[f"{part} @ {where}"] = {
                "colour": nearest_centroid_accuracy(row, colour_labels),
                "shape": nearest_centroid_accuracy(row, shape_labels),
            }
    return results


def format_probe(results: dict) -> str:
    lines = [f"{'states':<24}{'colour':>8}{'shape':>8}", "-" * 40]
    lines += [f"{name:<24}{acc['colour']:>8.2f}{acc['shape']:>8.2f}" for name, acc in results.items()]
    lines.append(f"chance: colour {1 / len(COLORS):.2f}, shape {1 / len(SHAPES):.2f}")
    return "\n".join(lines)


def run(ckpt: str, out: str | None = None, model: ModelOverrides = ModelOverrides()) -> int:
    """Print (and optionally write) how well a stage 2 model's states carry the prompt's colour and shape.

    Args:
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar directory).
        out: write the accuracies to this JSON file.
        model: overrides of what the checkpoint records.
    """
    results = probe_prompt_states(load_model(ckpt, model))
    print(format_probe(results))
    write_json(results, out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(command_line(run))
