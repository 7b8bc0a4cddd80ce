"""Generate the procedural Shapes world: webdataset shards for every stage plus the evaluation sets.

    python -m lit_star data shapes --out runs/shapes_world
    python -m lit_star data shapes --out /tmp/w --world.seed 1 --world.resolution 128 --world.t2i_train 20000 --overwrite true
    python -m lit_star data shapes --config recipes/shapes/world/attribute_captions.yaml --out runs/shapes_world_attr

Same seed and sizes give the same bytes. Layout, sample keys and the held-out combinations are in
``docs/shapes_world.md``; the scene vocabulary and rendering are in :mod:`lit_star.worlds.shapes.world`.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from lit_star.data.webdataset_io import reproducible_tar_writer
from lit_star.worlds.shapes.world import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOR_HINTS,
    COLORS,
    COUNT_HINTS,
    EDIT_CATEGORIES,
    GENEVAL_CATEGORIES,
    GRID,
    HELD_OUT_COMBOS,
    HEXAGON_ASPECT,
    RELATION_PHRASES,
    RELATIONS,
    SCHEMA_VERSION,
    SHAPE_HINTS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    Scene,
    WorldObject,
    dpg_description,
    noun_phrase,
    one_attribute_phrase,
    render_scene,
    scene_relations,
)

RIDDLE_CATEGORIES = ("single_object", "two_objects", "counting", "position")
VQA_TYPES = ("count", "color", "shape", "relation", "caption")
# Asked in training only, with WorldConfig.grounding_questions: relations and scene descriptions need each
# object's place and size, which the descriptions alone teach the tiny base slowly (docs/base.md, "Where and size
# questions in training": with them 6000 stage 0 steps reach VQA 0.787, captions 0.50; colour is held back for 2000 steps).
GROUNDING_TYPES = ("where", "size")

# How often each kind of sample is drawn for training.
T2I_MIX = {"single_object": 0.12, "two_objects": 0.14, "counting": 0.16, "colors": 0.10,
           "position": 0.16, "color_attr": 0.12, "dpg": 0.20}
# With WorldConfig.attribute_captions the t2i *training* split also draws one object named by its colour
# alone ("a red object") or its shape alone ("a star"). In the default mix a shape word always comes
# with a colour word, so the stack can learn the 40 training pairs as a lookup and draw a held-out
# "red star" as a red shape it has seen (docs/stack.md, "The 5600-step stack at lower guidance"); here each word must steer the
# image on its own.
T2I_ATTRIBUTE_MIX = {**{k: v * 0.75 for k, v in T2I_MIX.items()}, "one_attribute": 0.25}
VQA_MIX = {"count": 0.22, "color": 0.20, "shape": 0.18, "relation": 0.22, "caption": 0.18}
VQA_GROUNDING_MIX = {"count": 0.15, "color": 0.13, "shape": 0.12, "relation": 0.18, "caption": 0.17,
                     "where": 0.15, "size": 0.10}
RIDDLE_MIX = {"single_object": 0.4, "two_objects": 0.2, "counting": 0.2, "position": 0.2}

TRAIN_COMBOS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT_COMBOS)
ALL_CELLS = tuple(CELL_NAMES)
EVAL_DIR = "eval"


@dataclass
class WorldConfig:
    """What a Shapes world holds: sizes of every split and the training-data variants.

    Args:
        seed: the world's seed; the same seed and sizes give the same bytes.
        resolution: image side in pixels (>= 32).
        t2i_train: text-to-image training samples (t2i_val: validation samples; likewise for the others).
        vqa_train: VQA training samples (questions about one image).
        edit_train: editing training samples (source, instruction, target).
        knowledge_train: knowledge riddles (text only) for training.
        geneval_per_category: GenEval-style eval prompts per category (held-out colour/shape pairs).
        geneval_seen_per_category: GenEval-style prompts per category drawn the same way from training
            colour/shape pairs (``eval/geneval_seen.jsonl``, ShapesEval's "seen" score).
        geneval_seen_dev_per_category: a second seen-pair set from its own seed (``eval/geneval_seen_dev.jsonl``),
            for choosing sampler settings; never scored as a result.
        edit_eval_per_category: edit eval pairs per category.
        knowledge_eval_size: riddles in the knowledge eval set.
        shard_size: samples per webdataset shard.
        grounding_questions: training VQA also asks where objects are and their size (validation unchanged).
        attribute_captions: training text-to-image also names single objects by colour or shape alone
            (validation unchanged).
    """

    seed: int = 0
    resolution: int = 64
    t2i_train: int = 6000
    t2i_val: int = 300
    vqa_train: int = 12000
    vqa_val: int = 300
    edit_train: int = 3000
    edit_val: int = 200
    knowledge_train: int = 2000
    knowledge_val: int = 200
    geneval_per_category: int = 50
    geneval_seen_per_category: int = 50
    geneval_seen_dev_per_category: int = 50
    edit_eval_per_category: int = 30
    knowledge_eval_size: int = 100
    shard_size: int = 1000
    grounding_questions: bool = False
    attribute_captions: bool = False


@dataclass
class Prompt:
    """A scene with the caption that names it and the GenEval-style requirements the caption implies."""

    category: str
    scene: Scene
    caption: str
    include: list[dict]
    exclude: list[dict]
    subjects: list[tuple[str, str, int]]  # (colour, shape, count) in caption order
    relation: str | None = None


# ---------------------------------------------------------------- sampling


def _combo(rng: random.Random, held_out: bool) -> tuple[str, str]:
    return rng.choice(HELD_OUT_COMBOS if held_out else TRAIN_COMBOS)


def _train_combo_where(rng: random.Random, keep: Callable[[tuple[str, str]], bool]) -> tuple[str, str]:
    return rng.choice([c for c in TRAIN_COMBOS if keep(c)])


def _size(rng: random.Random) -> str:
    return rng.choice(tuple(SIZES))


def _background(rng: random.Random) -> str:
    return rng.choice(tuple(BACKGROUNDS))


def _requirement(color: str, shape: str, count: int = 1) -> dict:
    return {"shape": shape, "color": color, "count": count}


def sample_prompt(rng: random.Random, category: str, held_out: bool, resolution: int) -> Prompt:
    """A caption of ``category`` and the scene it describes. With ``held_out`` one subject is a held-out
    combination (the other, if any, is not); without, no object is."""
    cells = list(ALL_CELLS)
    rng.shuffle(cells)
    background = _background(rng)
    if category in ("single_object", "colors"):
        color, shape = _combo(rng, held_out)
        scene = Scene(background, (WorldObject(shape, color, _size(rng), cells[0]),))
        return Prompt(category, scene, noun_phrase(color, shape), [_requirement(color, shape)], [], [(color, shape, 1)])
    if category == "counting":
        color, shape = _combo(rng, held_out)
        count = rng.choice((2, 3, 4))
        objects = tuple(WorldObject(shape, color, _size(rng), cell) for cell in cells[:count])
        return Prompt(category, Scene(background, objects), noun_phrase(color, shape, count),
                      [_requirement(color, shape, count)], [_requirement(color, shape, count + 1)],
                      [(color, shape, count)])
    if category in ("two_objects", "color_attr", "position"):
        first = _combo(rng, held_out)
        if category == "color_attr":  # both attributes differ, so a swapped binding is a wrong image
            second = _train_combo_where(rng, lambda c: c[0] != first[0] and c[1] != first[1])
        else:
            second = _train_combo_where(rng, lambda c: c[1] != first[1])
        if held_out and rng.random() < 0.5:
            first, second = second, first
        (ca, sa), (cb, sb) = first, second
        if category != "position":
            # Named in reading order, as descriptions are: the first named is the first drawn.
            cell_a, cell_b = cells[0], cells[1]
            if cell_b < cell_a:
                (ca, sa, cell_a), (cb, sb, cell_b) = (cb, sb, cell_b), (ca, sa, cell_a)
            scene = Scene(background, (WorldObject(sa, ca, _size(rng), cell_a), WorldObject(sb, cb, _size(rng), cell_b)))
            caption = f"{noun_phrase(ca, sa)} and {noun_phrase(cb, sb)}"
            return Prompt(category, scene, caption, [_requirement(ca, sa), _requirement(cb, sb)], [],
                          [(ca, sa, 1), (cb, sb, 1)])
        relation = rng.choice(RELATIONS)
        size_a, size_b = _size(rng), _size(rng)
        # Only placements where the named relation is the sole one (no diagonals), so the image says
        # exactly what the caption says.
        pairs = [(p, q) for p in ALL_CELLS for q in ALL_CELLS if p != q and scene_relations(
            WorldObject(sa, ca, size_a, p), WorldObject(sb, cb, size_b, q), resolution) == {relation}]
        cell_a, cell_b = rng.choice(pairs)
        scene = Scene(background, (WorldObject(sa, ca, size_a, cell_a), WorldObject(sb, cb, size_b, cell_b)))
        caption = f"{noun_phrase(ca, sa)} {RELATION_PHRASES[relation]} {noun_phrase(cb, sb)}"
        # GenEval's order: the reference object first, the placed one relative to it (group 0).
        include = [_requirement(cb, sb), {**_requirement(ca, sa), "position": [relation, 0]}]
        return Prompt(category, scene, caption, include, [], [(ca, sa, 1), (cb, sb, 1)], relation)
    if category == "dpg":
        count = rng.randint(2, 5)
        combos = rng.sample(HELD_OUT_COMBOS if held_out else TRAIN_COMBOS, count)
        objects = [WorldObject(shape, color, _size(rng), cell) for (color, shape), cell in zip(combos, cells)]
        scene = Scene(background, tuple(objects))
        include = [_requirement(o.color, o.shape) for o in objects]
        return Prompt(category, scene, dpg_description(scene), include, [], [(o.color, o.shape, 1) for o in objects])
    raise ValueError(f"unknown caption category {category!r}")


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """Training scene whose objects have distinct (colour, shape) descriptions, none held out."""
    cells = list(ALL_CELLS)
    rng.shuffle(cells)
    count = rng.randint(min_objects, max_objects)
    objects = tuple(WorldObject(shape, color, _size(rng), cell)
                    for (color, shape), cell in zip(rng.sample(TRAIN_COMBOS, count), cells))
    return Scene(_background(rng), objects)


def _the(o: WorldObject) -> str:
    return f"the {o.color} {o.shape}"


def sample_vqa(rng: random.Random, scene: Scene, qtype: str, resolution: int) -> tuple[str, str, str]:
    """(question, short answer, question type actually used) about ``scene``."""
    objects = scene.objects
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objects) for c in COLORS}
    if qtype == "color":
        unique = [o for o in objects if shape_counts[o.shape] == 1]
        if unique:
            o = rng.choice(unique)
            return f"What color is the {o.shape}?", o.color, qtype
    if qtype == "shape":
        unique = [o for o in objects if color_counts[o.color] == 1]
        if unique:
            o = rng.choice(unique)
            return f"What shape is the {o.color} object?", o.shape, qtype
    if qtype == "relation" and len(objects) >= 2:
        a, b = rng.sample(objects, 2)
        holding = scene_relations(a, b, resolution)
        want_yes = bool(holding) and rng.random() < 0.5
        relation = rng.choice(sorted(holding)) if want_yes else rng.choice([r for r in RELATIONS if r not in holding])
        answer = "yes" if relation in holding else "no"
        return f"Is {_the(a)} {RELATION_PHRASES[relation]} {_the(b)}?", answer, "relation"
    if qtype == "caption":
        return "Describe the image.", dpg_description(scene), qtype
    if qtype in GROUNDING_TYPES:
        pair_counts = Counter((o.color, o.shape) for o in objects)
        unique = [o for o in objects if pair_counts[o.color, o.shape] == 1]
        if unique:
            o = rng.choice(unique)
            if qtype == "where":
                return f"Where is {_the(o)}?", CELL_NAMES[o.cell], qtype
            return f"What size is {_the(o)}?", o.size, qtype
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        return f"How many {SHAPE_PLURALS[shape]} are there?", str(shape_counts[shape]), "count"
    color = rng.choice(tuple(COLORS))
    return f"How many {color} objects are there?", str(color_counts[color]), "count"


def _empty_cells(scene: Scene) -> list[tuple[int, int]]:
    return [c for c in ALL_CELLS if c not in scene.occupied_cells()]


def _unique_descriptions(scene: Scene) -> bool:
    return len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)


def sample_edit(rng: random.Random, category: str, held_out: bool) -> tuple[Scene, Scene, str]:
    """(source, target, instruction). With ``held_out`` the edited object is a held-out combination
    (for a background edit, one of the objects is); otherwise no object in either scene is."""
    while True:
        source = random_scene(rng, 1, 3)
        index = rng.randrange(len(source.objects))
        obj = source.objects[index]
        if held_out and category in ("remove", "move", "background"):
            color, shape = _combo(rng, True)
            obj = WorldObject(shape, color, obj.size, obj.cell)
            source = source.with_object(index, obj)
        if category == "add":
            color, shape = _combo(rng, held_out)
            new = WorldObject(shape, color, _size(rng), rng.choice(_empty_cells(source)))
            target = Scene(source.background, source.objects + (new,))
            instruction = rng.choice(("Add {} at the {}.", "Put {} at the {}.")).format(
                noun_phrase(color, shape, size=new.size), CELL_NAMES[new.cell])
        elif category == "remove":
            target = source.without(index)
            instruction = rng.choice(("Remove {}.", "Delete {} from the image.")).format(_the(obj))
        elif category == "replace":
            shapes = [s for s in SHAPES if s != obj.shape and ((obj.color, s) in HELD_OUT_COMBOS) == held_out]
            if not shapes:
                continue
            new = WorldObject(rng.choice(shapes), obj.color, obj.size, obj.cell)
            target = source.with_object(index, new)
            instruction = rng.choice(("Replace {} with a {}.", "Turn {} into a {}.")).format(_the(obj), new.shape)
        elif category == "adjust":
            colors = [c for c in COLORS if c != obj.color and ((c, obj.shape) in HELD_OUT_COMBOS) == held_out]
            if not colors:
                continue
            new = WorldObject(obj.shape, rng.choice(colors), obj.size, obj.cell)
            target = source.with_object(index, new)
            instruction = rng.choice(("Make {} {}.", "Change the colour of {} to {}.")).format(_the(obj), new.color)
        elif category == "background":
            new_background = rng.choice([b for b in BACKGROUNDS if b != source.background])
            target = Scene(new_background, source.objects)
            instruction = rng.choice(("Change the background to {}.", "Make the background {}.")).format(new_background)
        elif category == "move":
            cell = rng.choice(_empty_cells(source))
            target = source.with_object(index, WorldObject(obj.shape, obj.color, obj.size, cell))
            instruction = rng.choice(("Move {} to the {}.", "Place {} at the {} instead.")).format(_the(obj), CELL_NAMES[cell])
        else:
            raise ValueError(f"unknown edit category {category!r}")
        if _unique_descriptions(source) and _unique_descriptions(target):
            return source, target, instruction


def _object_hint(rng: random.Random, color: str, shape: str, count: int) -> str:
    singular, plural = rng.choice(SHAPE_HINTS[shape])
    color_hint = rng.choice(COLOR_HINTS[color])
    if count == 1:
        return f"{singular}, {color_hint}"
    return f"{plural}, {color_hint}, {rng.choice(COUNT_HINTS[count])}"


def riddle_for(rng: random.Random, prompt: Prompt) -> str:
    """Riddle text naming the prompt's subjects only through the fixed hint vocabulary."""
    hints = [_object_hint(rng, c, s, n) for c, s, n in prompt.subjects]
    if prompt.relation:
        return f"{hints[0]}, placed {RELATION_PHRASES[prompt.relation]} {hints[1]}"
    return ", together with ".join(hints)


# ---------------------------------------------------------------- writing


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def _mixture(rng: random.Random, mix: dict[str, float]) -> str:
    return rng.choices(tuple(mix), weights=tuple(mix.values()))[0]


def one_attribute_prompt(rng: random.Random, resolution: int) -> Prompt:
    """One training object (never a held-out pair) captioned by its colour alone or its shape alone."""
    single = sample_prompt(rng, "single_object", False, resolution)
    color, shape, _ = single.subjects[0]
    if rng.random() < 0.5:
        caption, include = one_attribute_phrase(color=color), {"color": color, "count": 1}
    else:
        caption, include = one_attribute_phrase(shape=shape), {"shape": shape, "count": 1}
    return Prompt("one_attribute", single.scene, caption, [include], [], single.subjects)


def _t2i_samples(rng, n, cfg: WorldConfig, split: str) -> Iterator[dict]:
    res = cfg.resolution
    mix = T2I_ATTRIBUTE_MIX if cfg.attribute_captions and split == "train" else T2I_MIX
    for _ in range(n):
        category = _mixture(rng, mix)
        p = one_attribute_prompt(rng, res) if category == "one_attribute" else sample_prompt(rng, category, False, res)
        yield {"png": _png(render_scene(p.scene, res)), "txt": p.caption.encode(),
               "json": _json_bytes({"category": p.category, **p.scene.to_meta(res)})}


def _vqa_samples(rng, n, cfg: WorldConfig, split: str) -> Iterator[dict]:
    res = cfg.resolution
    mix = VQA_GROUNDING_MIX if cfg.grounding_questions and split == "train" else VQA_MIX
    for _ in range(n):
        scene = random_scene(rng)
        question, answer, qtype = sample_vqa(rng, scene, _mixture(rng, mix), res)
        yield {"png": _png(render_scene(scene, res)), "question.txt": question.encode(), "answer.txt": answer.encode(),
               "json": _json_bytes({"qtype": qtype, **scene.to_meta(res)})}


def _edit_samples(rng, n, cfg: WorldConfig, split: str) -> Iterator[dict]:
    res = cfg.resolution
    for _ in range(n):
        category = rng.choice(EDIT_CATEGORIES)
        source, target, instruction = sample_edit(rng, category, False)
        yield {"source.png": _png(render_scene(source, res)), "target.png": _png(render_scene(target, res)),
               "txt": instruction.encode(),
               "json": _json_bytes({"category": category, "source": source.to_meta(res), "target": target.to_meta(res)})}


def _knowledge_samples(rng, n, cfg: WorldConfig, split: str) -> Iterator[dict]:
    res = cfg.resolution
    for _ in range(n):
        p = sample_prompt(rng, _mixture(rng, RIDDLE_MIX), False, res)
        yield {"txt": riddle_for(rng, p).encode(), "answer.txt": p.caption.encode(),
               "json": _json_bytes({"category": p.category, "caption": p.caption, **p.scene.to_meta(res)})}


SHARD_SETS: dict[str, Callable] = {"t2i": _t2i_samples, "vqa": _vqa_samples, "edit": _edit_samples,
                                   "knowledge": _knowledge_samples}


def _write_shards(out: Path, task: str, split: str, samples: Iterator[dict], shard_size: int, bar) -> list[str]:
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    writer = None
    for index, sample in enumerate(samples):
        if index % shard_size == 0:
            if writer is not None:
                writer.close()
            name = f"{split}-{len(names):06d}.tar"
            names.append(f"{task}/{name}")
            writer = reproducible_tar_writer(folder / name)
        writer.write({"__key__": f"{task}-{split}-{index:06d}", **sample})
        bar.update(1)
    if writer is not None:
        writer.close()
    return names


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _eval_prompts(rng: random.Random, categories, per_category: int, res: int, distinct: Callable[[str], bool],
                  held_out: bool = True):
    """``per_category`` prompts per category; multi-object prompts have distinct captions."""
    for category in categories:
        seen: set[str] = set()
        made = attempts = 0
        while made < per_category:
            prompt = sample_prompt(rng, category, held_out, res)
            attempts += 1
            # Repeats are accepted only once distinct captions have clearly run out.
            if distinct(category) and prompt.caption in seen and attempts < 50 * per_category:
                continue
            seen.add(prompt.caption)
            yield f"{category}_{made:03d}", prompt
            made += 1


def _prompt_record(prompt_id: str, prompt: Prompt, res: int) -> dict:
    record = {"id": prompt_id, "category": prompt.category, "prompt": prompt.caption, "include": prompt.include,
              **prompt.scene.to_meta(res)}
    if prompt.exclude:
        record["exclude"] = prompt.exclude
    return record


def _riddle_record(rng: random.Random, prompt_id: str, prompt: Prompt, res: int) -> dict:
    """The prompt's record with its riddle as the prompt and its caption as the expected answer."""
    record = _prompt_record(prompt_id, prompt, res)
    record["caption"], record["prompt"] = prompt.caption, riddle_for(rng, prompt)
    return record


def seen_combination_prompts(per_category: int, seed: int = 0, resolution: int = 64,
                             development: bool = False) -> list[dict]:
    """GenEval-style prompt records drawn like the held-out eval set but from training colour/shape pairs.

    ShapesEval's "seen" set (written to ``eval/geneval_seen.jsonl``): a stack that fails these cannot draw
    what it was trained on, while one that passes these but not the held-out set fails at composing unseen
    pairs. ``development`` draws the development set instead (``eval/geneval_seen_dev.jsonl``, its own RNG
    stream, ids ``geneval_seen_dev_*``), on which sampler settings are chosen.
    """
    name = "geneval_seen_dev" if development else "geneval_seen"
    rng = random.Random(f"shapes:{seed}:eval:{name}")
    return [_prompt_record(f"{name}_{prompt_id}", prompt, resolution)
            for prompt_id, prompt in _eval_prompts(rng, GENEVAL_CATEGORIES, per_category, resolution,
                                                   lambda c: c not in ("single_object", "colors"), held_out=False)]


def seen_combination_riddles(per_category: int, seed: int = 0, resolution: int = 64) -> list[dict]:
    """Knowledge riddle records whose answers name only colour/shape pairs seen in training.

    The world's riddle set answers with held-out pairs, so a stack that cannot compose scores near zero
    with or without reasoning. On these the drawing is within reach, and the gap between drawing the
    riddle and drawing the base's answer measures implicit reasoning alone. Their texts come from the
    same hint vocabulary as the training riddles and may repeat one.
    """
    rng = random.Random(f"shapes:{seed}:eval:knowledge_seen")
    records = []
    for prompt_id, prompt in _eval_prompts(rng, RIDDLE_CATEGORIES, per_category, resolution,
                                           lambda c: c != "single_object", held_out=False):
        records.append(_riddle_record(rng, f"knowledge_seen_{prompt_id}", prompt, resolution))
    return records


def write_eval_sets(out: Path, cfg: WorldConfig, bar) -> dict:
    res, folder = cfg.resolution, out / EVAL_DIR
    for sub in ("geneval_gt", "edit_source", "edit_gt", "knowledge_gt"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    single_texts = {"single_object", "colors"}  # only 10 held-out combinations: repeated texts, varied scenes
    rng = random.Random(f"shapes:{cfg.seed}:eval:geneval")
    geneval = []
    for prompt_id, prompt in _eval_prompts(rng, GENEVAL_CATEGORIES, cfg.geneval_per_category, res,
                                           lambda c: c not in single_texts):
        prompt_id = f"geneval_{prompt_id}"
        geneval.append(_prompt_record(prompt_id, prompt, res))
        render_scene(prompt.scene, res).save(folder / "geneval_gt" / f"{prompt_id}.png")
        bar.update(1)
    _write_jsonl(folder / "geneval.jsonl", geneval)

    rng = random.Random(f"shapes:{cfg.seed}:eval:edit")
    edits = []
    for category in EDIT_CATEGORIES:
        for i in range(cfg.edit_eval_per_category):
            source, target, instruction = sample_edit(rng, category, True)
            pair_id = f"edit_{category}_{i:03d}"
            edits.append({"id": pair_id, "category": category, "instruction": instruction,
                          "source": source.to_meta(res), "target": target.to_meta(res)})
            render_scene(source, res).save(folder / "edit_source" / f"{pair_id}.png")
            render_scene(target, res).save(folder / "edit_gt" / f"{pair_id}.png")
            bar.update(1)
    _write_jsonl(folder / "edit.jsonl", edits)

    rng = random.Random(f"shapes:{cfg.seed}:eval:knowledge")
    knowledge = []
    per_category = -(-cfg.knowledge_eval_size // len(RIDDLE_CATEGORIES))
    for prompt_id, prompt in _eval_prompts(rng, RIDDLE_CATEGORIES, per_category, res,
                                           lambda c: c != "single_object"):
        if len(knowledge) == cfg.knowledge_eval_size:
            break
        record = _riddle_record(rng, f"knowledge_{prompt_id}", prompt, res)
        knowledge.append(record)
        render_scene(prompt.scene, res).save(folder / "knowledge_gt" / f"{record['id']}.png")
        bar.update(1)
    _write_jsonl(folder / "knowledge.jsonl", knowledge)

    # Written last, each from its own RNG stream, so every file above is the same as before these existed.
    seen_sets = {}
    for name, per_category, development in (("geneval_seen", cfg.geneval_seen_per_category, False),
                                            ("geneval_seen_dev", cfg.geneval_seen_dev_per_category, True)):
        records = seen_combination_prompts(per_category, cfg.seed, res, development=development)
        (folder / f"{name}_gt").mkdir(parents=True, exist_ok=True)
        for record in records:
            render_scene(Scene.from_meta(record), res).save(folder / f"{name}_gt" / f"{record['id']}.png")
            bar.update(1)
        _write_jsonl(folder / f"{name}.jsonl", records)
        seen_sets[name] = {"prompts": f"{EVAL_DIR}/{name}.jsonl", "images": f"{EVAL_DIR}/{name}_gt", "count": len(records)}
    return {
        "geneval": {"prompts": f"{EVAL_DIR}/geneval.jsonl", "images": f"{EVAL_DIR}/geneval_gt", "count": len(geneval)},
        "edit": {"prompts": f"{EVAL_DIR}/edit.jsonl", "source_images": f"{EVAL_DIR}/edit_source",
                 "images": f"{EVAL_DIR}/edit_gt", "count": len(edits)},
        "knowledge": {"prompts": f"{EVAL_DIR}/knowledge.jsonl", "images": f"{EVAL_DIR}/knowledge_gt",
                      "count": len(knowledge)},
        **seen_sets,
    }


def world_vocabulary() -> dict:
    return {
        "shapes": list(SHAPES), "colors": {k: list(v) for k, v in COLORS.items()},
        "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}, "sizes": SIZES, "grid": GRID,
        "cells": {f"{r},{c}": name for (r, c), name in CELL_NAMES.items()}, "hexagon_aspect": HEXAGON_ASPECT,
        "relations": list(RELATIONS),
    }


OUTPUTS = ("world.json", *SHARD_SETS, EVAL_DIR)


def generate_world(out: str | Path, cfg: WorldConfig | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the whole world under ``out`` and return the contents of its ``world.json``."""
    cfg = cfg or WorldConfig()
    if cfg.resolution < 32:
        raise ValueError(f"resolution {cfg.resolution} is too small for a {GRID}x{GRID} grid of shapes (use >= 32)")
    if cfg.shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {cfg.shard_size}")
    for f in fields(cfg):
        if getattr(cfg, f.name) < 0:
            raise ValueError(f"{f.name} must not be negative, got {getattr(cfg, f.name)}")
    out = Path(out)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a world ({', '.join(existing)}); pass overwrite (--overwrite true) to replace it")
    for name in existing:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)

    plan = [(task, split, getattr(cfg, f"{task}_{split}")) for task in SHARD_SETS for split in ("train", "val")]
    eval_count = (len(GENEVAL_CATEGORIES) * (cfg.geneval_per_category + cfg.geneval_seen_per_category
                                             + cfg.geneval_seen_dev_per_category)
                  + len(EDIT_CATEGORIES) * cfg.edit_eval_per_category + cfg.knowledge_eval_size)
    splits: dict[str, dict] = {}
    with tqdm(total=sum(n for *_, n in plan) + eval_count, desc="shapes world", unit="sample",
              disable=not progress, file=sys.stderr) as bar:
        for task, split, n in plan:
            rng = random.Random(f"shapes:{cfg.seed}:{task}:{split}")
            bar.set_postfix_str(f"{task}/{split}")
            shards = _write_shards(out, task, split, SHARD_SETS[task](rng, n, cfg, split), cfg.shard_size, bar)
            splits.setdefault(task, {})[split] = {"samples": n, "shards": shards}
        bar.set_postfix_str("eval")
        eval_sets = write_eval_sets(out, cfg, bar)

    world = {
        "schema_version": SCHEMA_VERSION,
        "generator": "lit_star.worlds.shapes.generator",
        "config": asdict(cfg),
        "vocabulary": world_vocabulary(),
        "held_out_combos": [list(c) for c in HELD_OUT_COMBOS],
        "riddle_hints": {"colors": COLOR_HINTS, "shapes": {k: [list(p) for p in v] for k, v in SHAPE_HINTS.items()},
                         "counts": {str(k): v for k, v in COUNT_HINTS.items()}},
        "splits": splits,
        "eval": eval_sets,
    }
    (out / "world.json").write_text(json.dumps(world, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return world


def generate(out: str, world: WorldConfig = WorldConfig(), overwrite: bool = False, progress: bool = True) -> int:
    """Generate the procedural Shapes world (webdataset shards for every stage plus the eval sets).

    Args:
        out: output folder.
        world: sizes and variants (a world recipe such as ``recipes/shapes/world/attribute_captions.yaml``).
        overwrite: replace a world already in ``out``.
        progress: show the progress bar.
    """
    try:
        written = generate_world(out, world, progress=progress, overwrite=overwrite)
    except (FileExistsError, ValueError) as err:
        print(f"data shapes: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{t} {s['train']['samples']}/{s['val']['samples']}" for t, s in written["splits"].items())
    print(f"wrote {out}: train/val {counts}; eval " +
          ", ".join(f"{k} {v['count']}" for k, v in written["eval"].items()))
    return 0
