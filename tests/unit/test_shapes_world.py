"""The Shapes world generator: determinism, on-disk schema, held-out split, captions that match scenes."""

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lit_star.worlds.shapes import generator as shapes
from lit_star.worlds.shapes.generator import WorldConfig, generate_world
from lit_star.worlds.shapes.world import (
    BACKGROUNDS, CELL_NAMES, COLORS, COUNT_WORDS, HELD_OUT_COMBOS, SHAPE_PLURALS, SHAPES, Scene, WorldObject, object_bbox,
    one_attribute_phrase, relations_between, render_scene, scene_relations,
)

TINY = dict(t2i_train=60, t2i_val=8, vqa_train=60, vqa_val=8, edit_train=30, edit_val=6, knowledge_train=30,
            knowledge_val=6, geneval_per_category=4, edit_eval_per_category=3, knowledge_eval_size=8, shard_size=25,
            geneval_seen_per_category=4, geneval_seen_dev_per_category=3)
# sha256 of the sorted "path sha256" lines of every file of the TINY world (seed 0) except world.json, as the
# generator wrote them before the seen-pair eval sets existed (commit a2a8b78): training shards and the older
# eval files must not move when eval sets are added.
TINY_WORLD_DIGEST_BEFORE_SEEN_SETS = "3f94bbf9cbce7302c256cfa04a01f84f701939297650227f966acc5709e8e1fd"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(world: Path, task: str, split: str) -> list[dict]:
    info = json.loads((world / "world.json").read_text())
    urls = [str(world / s) for s in info["splits"][task][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig(seed=0, **TINY), progress=False)
    return out


def test_same_seed_gives_same_bytes_and_another_seed_differs(world, tmp_path):
    generate_world(tmp_path / "again", WorldConfig(seed=0, **TINY), progress=False)
    generate_world(tmp_path / "other", WorldConfig(seed=1, **TINY), progress=False)
    first, again, other = _tree_digest(world), _tree_digest(tmp_path / "again"), _tree_digest(tmp_path / "other")
    assert len(first) > 50
    assert first == again
    shard = "t2i/train-000000.tar"
    assert other[shard] != first[shard]
    assert other["eval/geneval.jsonl"] != first["eval/geneval.jsonl"]


def test_world_json_documents_config_vocabulary_and_held_out(world):
    info = json.loads((world / "world.json").read_text())
    assert info["schema_version"] == 1
    assert info["config"]["t2i_train"] == TINY["t2i_train"]
    assert len(info["vocabulary"]["colors"]) >= 8 and set(SHAPES) <= set(info["vocabulary"]["shapes"])
    assert [tuple(c) for c in info["held_out_combos"]] == list(HELD_OUT_COMBOS)
    assert info["splits"]["t2i"]["train"]["shards"] == [f"t2i/train-{i:06d}.tar" for i in range(3)]
    for entry in info["eval"].values():
        assert (world / entry["prompts"]).is_file() and (world / entry["images"]).is_dir()


def _check_scene_meta(meta: dict, resolution: int) -> Scene:
    scene = Scene.from_meta(meta)  # validates names, cells, no shared cells
    for obj, raw in zip(scene.objects, meta["objects"]):
        assert raw["bbox"] == pytest.approx(list(object_bbox(obj, resolution)), abs=0.01)
        assert 0 <= raw["bbox"][0] < raw["bbox"][2] <= resolution
    return scene


def _rgb(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == (64, 64)
    return image


def test_shard_samples_follow_the_schema(world):
    t2i = _samples(world, "t2i", "train")
    assert len(t2i) == TINY["t2i_train"]
    for s in t2i:
        assert {"__key__", "png", "txt", "json"} <= set(s)
        meta = json.loads(s["json"])
        assert meta["category"] in shapes.GENEVAL_CATEGORIES + ("dpg",)
        scene = _check_scene_meta(meta, 64)
        assert np.array_equal(np.asarray(_rgb(s["png"])), np.asarray(render_scene(scene, 64)))
        assert s["txt"].decode().strip()
    for s in _samples(world, "vqa", "val"):
        assert {"png", "question.txt", "answer.txt", "json"} <= set(s)
        assert json.loads(s["json"])["qtype"] in shapes.VQA_TYPES
        _rgb(s["png"])
    for s in _samples(world, "edit", "train"):
        meta = json.loads(s["json"])
        assert meta["category"] in shapes.EDIT_CATEGORIES
        source, target = _check_scene_meta(meta["source"], 64), _check_scene_meta(meta["target"], 64)
        assert source != target
        assert np.array_equal(np.asarray(_rgb(s["target.png"])), np.asarray(render_scene(target, 64)))
        assert s["txt"].decode().endswith(".")
    for s in _samples(world, "knowledge", "val"):
        assert {"txt", "answer.txt", "json"} <= set(s) and "png" not in s
        assert json.loads(s["json"])["caption"] == s["answer.txt"].decode()
    keys = [s["__key__"] for s in t2i]
    assert len(set(keys)) == len(keys) and "." not in "".join(keys)


def test_grounding_questions_are_asked_in_training_only_and_read_off_the_scene(world, tmp_path):
    assert {json.loads(s["json"])["qtype"] for s in _samples(world, "vqa", "train")} <= set(shapes.VQA_TYPES)
    grounded = tmp_path / "grounded"
    generate_world(grounded, WorldConfig(seed=0, grounding_questions=True, **TINY), progress=False)
    assert _tree_digest(grounded / "vqa")["val-000000.tar"] == _tree_digest(world / "vqa")["val-000000.tar"]
    asked = Counter()
    for s in _samples(grounded, "vqa", "train"):
        meta = json.loads(s["json"])
        if meta["qtype"] not in shapes.GROUNDING_TYPES:
            assert meta["qtype"] in shapes.VQA_TYPES
            continue
        asked[meta["qtype"]] += 1
        color, shape = re.fullmatch(r"(?:Where is|What size is) the (.+) (\w+)\?", s["question.txt"].decode()).groups()
        (named,) = [o for o in Scene.from_meta(meta).objects if (o.color, o.shape) == (color, shape)]
        expected = CELL_NAMES[named.cell] if meta["qtype"] == "where" else named.size
        assert s["answer.txt"].decode() == expected, s["__key__"]
    assert set(asked) == set(shapes.GROUNDING_TYPES)


def test_attribute_captions_name_one_training_object_by_colour_or_shape_in_training_only(world, tmp_path):
    named = tmp_path / "attributes"
    generate_world(named, WorldConfig(seed=0, attribute_captions=True, **TINY), progress=False)
    assert _tree_digest(named / "t2i")["val-000000.tar"] == _tree_digest(world / "t2i")["val-000000.tar"]
    by_colour = by_shape = 0
    for s in _samples(named, "t2i", "train"):
        meta, caption = json.loads(s["json"]), s["txt"].decode()
        if meta["category"] != "one_attribute":
            assert meta["category"] in shapes.GENEVAL_CATEGORIES + ("dpg",)
            continue
        (obj,) = meta["objects"]
        assert (obj["color"], obj["shape"]) not in HELD_OUT_COMBOS
        by_colour += caption == one_attribute_phrase(color=obj["color"])
        by_shape += caption == one_attribute_phrase(shape=obj["shape"])
    assert by_colour and by_shape
    assert one_attribute_phrase(color="orange") == "an orange object" and one_attribute_phrase(shape="star") == "a star"
    with pytest.raises(ValueError, match="exactly one"):
        one_attribute_phrase(color="red", shape="star")


def test_eval_sets_have_ids_images_and_sizes(world):
    geneval = [json.loads(line) for line in (world / "eval/geneval.jsonl").read_text().splitlines()]
    assert [r["category"] for r in geneval] == [c for c in shapes.GENEVAL_CATEGORIES for _ in range(4)]
    for r in geneval:
        assert (world / "eval/geneval_gt" / f"{r['id']}.png").is_file()
        _check_scene_meta(r, 64)
    edits = [json.loads(line) for line in (world / "eval/edit.jsonl").read_text().splitlines()]
    assert len(edits) == 6 * 3
    for r in edits:
        assert (world / "eval/edit_source" / f"{r['id']}.png").is_file()
        assert (world / "eval/edit_gt" / f"{r['id']}.png").is_file()
    knowledge = [json.loads(line) for line in (world / "eval/knowledge.jsonl").read_text().splitlines()]
    assert len(knowledge) == 8 and all(r["prompt"] != r["caption"] and r["include"] for r in knowledge)


def test_seen_pair_sets_leave_every_older_file_byte_identical(world):
    lines = sorted(f"{path} {digest}" for path, digest in _tree_digest(world).items()
                   if path != "world.json" and not path.startswith("eval/geneval_seen"))
    assert len(lines) == 85
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == TINY_WORLD_DIGEST_BEFORE_SEEN_SETS


def test_seen_pair_sets_use_training_pairs_and_differ_from_each_other(world):
    info = json.loads((world / "world.json").read_text())
    held = set(HELD_OUT_COMBOS)
    texts = {}
    for name, per_category in (("geneval_seen", 4), ("geneval_seen_dev", 3)):
        assert info["eval"][name] == {"prompts": f"eval/{name}.jsonl", "images": f"eval/{name}_gt",
                                      "count": 6 * per_category}
        records = [json.loads(line) for line in (world / f"eval/{name}.jsonl").read_text().splitlines()]
        assert [r["category"] for r in records] == [c for c in shapes.GENEVAL_CATEGORIES for _ in range(per_category)]
        assert records == shapes.seen_combination_prompts(per_category, 0, 64, development=name.endswith("dev"))
        for r in records:
            assert r["id"].startswith(f"{name}_") and (world / f"eval/{name}_gt/{r['id']}.png").is_file()
            assert not _combos(r) & held and not {(q["color"], q["shape"]) for q in r["include"]} & held
            _check_scene_meta(r, 64)
        texts[name] = [(r["prompt"], r["objects"]) for r in records]
    assert texts["geneval_seen"][:3] != texts["geneval_seen_dev"][:3], "the development set has its own seed"


def _combos(meta: dict) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in meta["objects"]}


def test_held_out_combinations_stay_out_of_training_and_drive_every_eval_prompt(world):
    held = set(HELD_OUT_COMBOS)
    for split in ("train", "val"):
        for s in _samples(world, "t2i", split) + _samples(world, "vqa", split) + _samples(world, "knowledge", split):
            assert not _combos(json.loads(s["json"])) & held, s["__key__"]
        for s in _samples(world, "edit", split):
            meta = json.loads(s["json"])
            assert not (_combos(meta["source"]) | _combos(meta["target"])) & held, s["__key__"]
    for name in ("geneval", "knowledge"):
        for line in (world / f"eval/{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert {(r["color"], r["shape"]) for r in record["include"]} & held, record["id"]
    for line in (world / "eval/edit.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert (_combos(record["source"]) | _combos(record["target"])) & held, record["id"]


def test_captions_and_answers_agree_with_the_scene(world):
    for s in _samples(world, "t2i", "train"):
        meta, caption = json.loads(s["json"]), s["txt"].decode()
        objects = meta["objects"]
        for o in objects:
            assert o["color"] in caption and (o["shape"] in caption or SHAPE_PLURALS[o["shape"]] in caption)
        if meta["category"] == "counting":
            assert caption.startswith(COUNT_WORDS[len(objects)] + " ")
        if meta["category"] == "position":
            relation = re.search(r"(to the left of|to the right of|above|below)", caption).group(1)
            relation = relation.replace("to the ", "")
            assert relations_between(objects[0]["bbox"], objects[1]["bbox"]) == {relation}
        if meta["category"] == "dpg":
            assert meta["background"] in caption
    for s in _samples(world, "vqa", "train"):
        meta, question, answer = json.loads(s["json"]), s["question.txt"].decode(), s["answer.txt"].decode()
        scene = Scene.from_meta(meta)
        if meta["qtype"] == "count":
            word = re.match(r"How many (\w+)", question).group(1)
            expected = sum(o.color == word or SHAPE_PLURALS[o.shape] == word for o in scene.objects)
            assert answer == str(expected)
        elif meta["qtype"] == "color":
            shape = re.match(r"What color is the (\w+)\?", question).group(1)
            assert [o.color for o in scene.objects if o.shape == shape] == [answer]
        elif meta["qtype"] == "shape":
            color = re.match(r"What shape is the (\w+) object\?", question).group(1)
            assert [o.shape for o in scene.objects if o.color == color] == [answer]
        elif meta["qtype"] == "relation":
            a, relation, b = re.match(r"Is the (\w+ \w+) (?:to the )?(left of|right of|above|below) the (\w+ \w+)\?",
                                      question).groups()
            find = {o.description: o for o in scene.objects}
            assert answer == ("yes" if relation in scene_relations(find[a], find[b], 64) else "no")
        elif meta["qtype"] == "caption":
            assert question == "Describe the image." and meta["background"] in answer


def _mention_order(text: str, objects: list[dict]) -> list[int]:
    return sorted(range(len(objects)), key=lambda i: text.index(f"{objects[i]['color']} {objects[i]['shape']}"))


def test_listing_captions_name_objects_in_reading_order(world):
    listings = [(json.loads(s["json"]), s["txt"].decode()) for s in _samples(world, "t2i", "train")
                if json.loads(s["json"])["category"] in ("two_objects", "color_attr", "dpg")]
    listings += [(json.loads(s["json"]), s["answer.txt"].decode()) for s in _samples(world, "vqa", "train")
                 if json.loads(s["json"])["qtype"] == "caption"]
    multi = [(meta["objects"], text) for meta, text in listings if len(meta["objects"]) > 1]
    for objects, text in multi:
        cells = [tuple(objects[i]["cell"]) for i in _mention_order(text, objects)]
        assert cells == sorted(cells), text
    assert len(multi) >= 5


def test_riddles_name_nothing_directly(world):
    # Count words may appear ("the shape with three corners"); colour and shape names may not.
    vocabulary = set(COLORS) | set(SHAPES) | set(SHAPE_PLURALS.values())
    riddles = [s["txt"].decode() for s in _samples(world, "knowledge", "train")]
    riddles += [json.loads(line)["prompt"] for line in (world / "eval/knowledge.jsonl").read_text().splitlines()]
    for riddle in riddles:
        assert not set(re.findall(r"[a-z]+", riddle.lower())) & vocabulary, riddle


def test_rendered_pixels_sit_inside_the_recorded_box():
    for shape in SHAPES:
        obj = WorldObject(shape, "blue", "large", (2, 0))
        image = np.asarray(render_scene(Scene("white", (obj,)), 64)).astype(int)
        ys, xs = np.nonzero((255 - image).sum(-1) > 0)
        x0, y0, x1, y1 = object_bbox(obj, 64)
        assert xs.min() >= np.floor(x0) and xs.max() + 1 <= np.ceil(x1)
        assert ys.min() >= np.floor(y0) and ys.max() + 1 <= np.ceil(y1)
        assert xs.max() + 1 - xs.min() >= (x1 - x0) - 1


def test_position_captions_use_relations_that_hold():
    left = WorldObject("circle", "red", "small", (1, 0))
    right = WorldObject("square", "blue", "large", (1, 2))
    assert scene_relations(left, right, 64) == {"left of"}
    assert scene_relations(right, left, 64) == {"right of"}


def test_existing_world_needs_overwrite(world, capsys):
    assert shapes.generate(str(world), progress=False) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        generate_world(tmp_path / "a", WorldConfig(resolution=16), progress=False)
    with pytest.raises(ValueError, match="t2i_train"):
        generate_world(tmp_path / "b", WorldConfig(t2i_train=-1), progress=False)
    with pytest.raises(ValueError, match="unknown colour"):
        Scene.from_meta({"background": "white", "objects": [
            {"shape": "circle", "color": "teal", "size": "small", "cell": [0, 0]}]})
    assert set(BACKGROUNDS).isdisjoint(COLORS)
