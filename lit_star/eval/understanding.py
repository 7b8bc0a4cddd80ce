"""Understanding accuracy of a base VLM on the Shapes world: VQA and knowledge riddles.

    python -m lit_star eval understanding --base runs/shapes/stage0_base/hf --world runs/shapes_world --out before.json
    python -m lit_star eval understanding --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \\
        --world runs/shapes_world --out after.json

The same greedy decoding and the same answer matching as stage 0's validation. Run on the stage 0
export and on the base inside a stage 2 checkpoint it shows whether stage 2 left understanding
untouched (the two JSON files must hold identical numbers and identical answers).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from lit_star.data.datamodules import KnowledgeDataModule, VQADataModule
from lit_star.eval.grading import answer_is_correct, description_parts, normalize_answer
from lit_star.models.base_vlm import (
    generate_answers,
    images_to_uint8,
)

OBJECT_PHRASE = re.compile(r"^an? (?P<size>\S+) (?P<color>\S+) (?P<shape>\S+) at the (?P<cell>.+)$")
DESCRIPTION_FIELDS = ("cell", "size", "color", "shape")


def description_breakdown(pairs: Iterable[tuple[str, str]]) -> dict:
    """Which parts of the scene descriptions a base gets right, over ``(prediction, answer)`` pairs.

    Exact match of a whole description hides what the base cannot read. Descriptions list objects in
    reading order, so the n-th object named is compared with the n-th true object, field by field
    (an object that is missing, or a phrase that does not parse, is wrong in every field).
    """
    descriptions = right_background = right_number = objects = 0
    right = dict.fromkeys(DESCRIPTION_FIELDS, 0)
    for prediction, answer in pairs:
        expected = description_parts(answer)
        if expected is None:
            raise ValueError(f"not a scene description: {answer!r}")
        found = description_parts(prediction) or ("", [])
        descriptions += 1
        right_background += found[0] == expected[0]
        right_number += len(found[1]) == len(expected[1])
        for index, phrase in enumerate(expected[1]):
            truth = OBJECT_PHRASE.match(phrase)
            if truth is None:
                raise ValueError(f"not an object of a scene description: {phrase!r} in {answer!r}")
            named = OBJECT_PHRASE.match(found[1][index]) if index < len(found[1]) else None
            objects += 1
            for field in DESCRIPTION_FIELDS:
                right[field] += named is not None and named[field] == truth[field]
    return {
        "descriptions": descriptions,
        "background": right_background / max(1, descriptions),
        "object_count": right_number / max(1, descriptions),
        "objects": objects,
        "per_object": {field: n / max(1, objects) for field, n in right.items()},
    }


def _val_batches(datamodule):
    datamodule.setup("validate")
    return datamodule.val_dataloader()


@torch.no_grad()
def understanding_accuracy(model, processor, world: str | Path, batch_size: int = 50,
                           max_new_tokens: int = 64, limit: int | None = None) -> dict:
    """VQA accuracy (overall and per question type) and riddle accuracy on the world's val split."""
    world = Path(world)
    model.eval()
    per_type: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, str] = {}
    descriptions: list[tuple[str, str]] = []
    vqa = VQADataModule(val_shards=str(world / "vqa" / "val-*.tar"), batch_size=batch_size, resolution=64)
    seen = 0
    for batch in tqdm(_val_batches(vqa), desc="vqa", unit="batch"):
        predictions = generate_answers(model, processor, list(batch["question"]), images_to_uint8(batch["image"]),
                                       max_new_tokens=max_new_tokens)
        for prediction, answer, meta, key in zip(predictions, batch["answer"], batch["meta"], batch["__key__"]):
            per_type[meta.get("qtype", "unknown")].append(answer_is_correct(prediction, answer, meta.get("qtype")))
            answers[f"vqa/{key}"] = prediction
            if meta.get("qtype") == "caption":
                descriptions.append((prediction, answer))
        seen += len(predictions)
        if limit is not None and seen >= limit:
            break
    riddles: list[bool] = []
    knowledge = KnowledgeDataModule(val_shards=str(world / "knowledge" / "val-*.tar"), batch_size=batch_size)
    seen = 0
    for batch in tqdm(_val_batches(knowledge), desc="riddles", unit="batch"):
        predictions = generate_answers(model, processor, list(batch["prompt"]), None, max_new_tokens=max_new_tokens)
        for prediction, answer, key in zip(predictions, batch["answer"], batch["__key__"]):
            riddles.append(normalize_answer(prediction) == normalize_answer(answer))
            answers[f"knowledge/{key}"] = prediction
        seen += len(predictions)
        if limit is not None and seen >= limit:
            break
    all_vqa = [ok for oks in per_type.values() for ok in oks]
    return {
        "vqa_accuracy": sum(all_vqa) / max(1, len(all_vqa)),
        "vqa_accuracy_by_type": {q: sum(v) / len(v) for q, v in sorted(per_type.items())},
        "vqa_questions": len(all_vqa),
        "descriptions": description_breakdown(descriptions),
        "riddle_accuracy": sum(riddles) / max(1, len(riddles)),
        "riddles": len(riddles),
        "answers": answers,
    }
