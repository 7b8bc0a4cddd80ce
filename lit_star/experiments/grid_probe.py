"""Does a base VLM know where its image tokens are? A linear probe of their grid row and column.

    python -m lit_star.experiments.grid_probe --base runs/shapes_curriculum/stage0_base/hf

Relation questions ("Is the red circle to the left of the blue square?") and the cells named in scene
descriptions need the place of an object, and Qwen2.5-VL's vision tower cannot supply it: its rotary
attention is relative and its patches do not overlap, so its output for an object is the same wherever
the object sits. Only the LLM can add the place (M-RoPE, the causal order). This command renders random
Shapes scenes, runs the base on "Describe the image." and, for the vision output and after every
decoder layer, fits a linear classifier (on 70% of the images) that reads each image token's own grid
row and column from its hidden state, and scores it on the other 30%, separately for tokens with an
object centred in them and for empty ones (a background token differs from its neighbours in nothing
but its place). Chance is 1 / grid side.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from lit_star.experiments import command_line, write_json
from lit_star.models.base_vlm import encode_chat, load_base_vlm, load_processor
from lit_star.worlds.shapes.generator import random_scene
from lit_star.worlds.shapes.world import object_center, render_scene

PROBE_QUESTION = "Describe the image."
TRAIN_FRACTION = 0.7


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor,
                          steps: int = 300, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a softmax classifier fitted on ``features[train]`` (standardised on them).

    ``train`` is a boolean row mask; the other rows are the test set.
    """
    if train.all() or not train.any():
        raise ValueError("the probe needs rows on both sides of the train/test split")
    features = features.double()
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    features = (features - mean) / std
    classes = int(labels.max()) + 1
    weight = torch.zeros(features.shape[1], classes, dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(features[train] @ weight + bias, labels[train]) + weight_decay * weight.square().sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = (features[~train] @ weight + bias).argmax(1)
    return float((predicted == labels[~train]).double().mean())


def _token_grid(image_grid_thw: torch.Tensor, merge: int) -> tuple[int, int]:
    t, h, w = (int(v) for v in image_grid_thw)
    if t != 1:
        raise ValueError(f"the probe reads still images, got a temporal grid of {t}")
    return h // merge, w // merge


@torch.no_grad()
def collect_image_token_states(model, processor, scenes, resolution: int = 64, batch_size: int = 50):
    """Hidden states of every image token, with the token's grid (row, column) and whether an object's
    centre falls inside it. Returns ``(states [layers + 1, tokens, dim], rows, columns, occupied, image index)``."""
    image_token = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    states, rows, columns, occupied, image_index = [], [], [], [], []
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start:start + batch_size]
        images = [np.asarray(render_scene(scene, resolution).convert("RGB")) for scene in batch]
        inputs = encode_chat(processor, [PROBE_QUESTION] * len(batch), images)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        hidden = torch.stack(model(**inputs, output_hidden_states=True).hidden_states).float().cpu()
        for b, scene in enumerate(batch):
            grid_h, grid_w = _token_grid(inputs["image_grid_thw"][b], merge)
            positions = (inputs["input_ids"][b] == image_token).nonzero().flatten().cpu()
            if len(positions) != grid_h * grid_w:
                raise ValueError(f"found {len(positions)} image tokens for a {grid_h} x {grid_w} token grid")
            centres = {(int(y * grid_h / resolution), int(x * grid_w / resolution))
                       for x, y in (object_center(o, resolution) for o in scene.objects)}
            for k, position in enumerate(positions.tolist()):
                row, column = divmod(k, grid_w)
                states.append(hidden[:, b, position])
                rows.append(row)
                columns.append(column)
                occupied.append((row, column) in centres)
                image_index.append(start + b)
    return (torch.stack(states, 1), torch.tensor(rows), torch.tensor(columns), torch.tensor(occupied),
            torch.tensor(image_index))


def probe_grid_positions(model, processor, images: int = 600, seed: int = 0, resolution: int = 64) -> dict:
    """Row and column probe accuracy per layer, for tokens with an object and for empty ones."""
    rng = random.Random(f"grid-probe:{seed}")
    scenes = [random_scene(rng) for _ in range(images)]
    states, rows, columns, occupied, image_index = collect_image_token_states(model, processor, scenes, resolution)
    train = image_index < int(TRAIN_FRACTION * images)
    layers = []
    for layer in range(states.shape[0]):
        entry = {"layer": layer, "where": "vision output" if layer == 0 else f"after decoder layer {layer}"}
        for name, mask in (("object", occupied), ("empty", ~occupied)):
            for axis, labels in (("row", rows), ("column", columns)):
                entry[f"{name}_{axis}"] = linear_probe_accuracy(states[layer][mask], labels[mask], train[mask])
        layers.append(entry)
    grid_side = int(max(rows.max(), columns.max())) + 1
    return {"images": images, "seed": seed, "object_tokens": int(occupied.sum()), "empty_tokens": int((~occupied).sum()),
            "chance": 1 / grid_side, "layers": layers}


def format_grid_probe(results: dict) -> str:
    lines = [f"{results['images']} images: {results['object_tokens']} image tokens with an object, "
             f"{results['empty_tokens']} empty; chance {results['chance']:.2f}",
             f"{'hidden states':<24}{'object row':>12}{'object col':>12}{'empty row':>12}{'empty col':>12}", "-" * 72]
    for entry in results["layers"]:
        lines.append(f"{entry['where']:<24}{entry['object_row']:>12.2f}{entry['object_column']:>12.2f}"
                     f"{entry['empty_row']:>12.2f}{entry['empty_column']:>12.2f}")
    return "\n".join(lines)


def run(base: str, images: int = 600, seed: int = 0, out: str | None = None) -> int:
    """Print (and optionally write) the grid probe table of a base VLM.

    Args:
        base: Qwen2.5-VL directory (a stage 0 export).
        images: random Shapes scenes to render (70% fit the probe, 30% score it); at least 4.
        seed: seed of the scenes and the split.
        out: write the accuracies to this JSON file.
    """
    if images < 4:
        raise ValueError("images must be at least 4 (the probe needs images on both sides of its split)")
    model, processor = load_base_vlm(base).eval(), load_processor(base)
    results = probe_grid_positions(model, processor, images, seed)
    print(format_grid_probe(results))
    write_json(results, out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(command_line(run))
