"""Calibrate ShapesEval's "unknown" thresholds on the world's ground truth, clean and degraded.

    python -m lit_star.experiments.scorer_calibration --seeds [0,1] --out calibration.json

For every object of every ground-truth eval image (GenEval-style, its seen-pair twin, riddles, edit
targets) and each degradation (JPEG quality 75 / 50, Gaussian blur 0.5 / 1 px, JPEG 75 then blur 1 / 2 px,
JPEG 50 then blur 1 px) it detects the objects with no threshold and records, for the detected object in
the object's cell, the outline misfit (``fit_error``) and the distance of the estimated colour from its
palette colour (``color_distance``). The same is measured on shapes outside the vocabulary (cross,
diamond, pentagon, upside-down triangle, six-pointed star, 0.7-aspect rectangle and ellipse) drawn in the
world's style, and on known shapes in off-palette colours (dark purple, greys, navy, teal, dark yellow).
A threshold is right when every ground-truth value is below it, with a margin, and the out-of-vocabulary
values above it.
"""

from __future__ import annotations

import io
import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lit_star.experiments import command_line, write_json
from lit_star.worlds.shapes.generator import WorldConfig, generate_world, seen_combination_prompts
from lit_star.worlds.shapes.scorer import (
    COLOUR_DISTANCE_LIMIT, FIT_ERROR_LIMIT, detect_objects, load_prompts, score_edits, score_geneval,
)
from lit_star.worlds.shapes.world import (
    BACKGROUNDS, COLORS, GRID, SIZES, SHAPES, Scene, render_scene,
)

# ------------------------------------------------------------------ degradations


def jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def degrade(image: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return degrade


def blur(radius: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: image.filter(ImageFilter.GaussianBlur(radius))


def then(*steps: Callable[[Image.Image], Image.Image]) -> Callable[[Image.Image], Image.Image]:
    def degrade(image: Image.Image) -> Image.Image:
        for step in steps:
            image = step(image)
        return image
    return degrade


DEGRADATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "clean": lambda image: image,
    "jpeg75": jpeg(75),
    "jpeg50": jpeg(50),
    "blur0.5": blur(0.5),
    "blur1": blur(1),
    "jpeg75+blur1": then(jpeg(75), blur(1)),
    "jpeg75+blur2": then(jpeg(75), blur(2)),
    "jpeg50+blur1": then(jpeg(50), blur(1)),
}

# ------------------------------------------------------------------ shapes and colours outside the world


def _regular(n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * i / n), math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    return [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / points),
             (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / points)) for k in range(2 * points)]


def _unit_box(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale and centre a polygon so that its bounding box is 1 wide and centred on the origin."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale, cx, cy = 1.0 / (max(xs) - min(xs)), (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [((x - cx) * scale, (y - cy) * scale) for x, y in points]


_ARM = 1 / 6  # half the width of a cross's bar, as a fraction of its width
FOREIGN_SHAPES: dict[str, list[tuple[float, float]] | str] = {
    "cross": [(-_ARM, -0.5), (_ARM, -0.5), (_ARM, -_ARM), (0.5, -_ARM), (0.5, _ARM), (_ARM, _ARM), (_ARM, 0.5),
              (-_ARM, 0.5), (-_ARM, _ARM), (-0.5, _ARM), (-0.5, -_ARM), (-_ARM, -_ARM)],
    "diamond": [(0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)],
    "pentagon": _unit_box(_regular(5)),
    "upside-down triangle": _unit_box(_regular(3, math.pi / 2)),
    "six-pointed star": _unit_box(_star(6, 1 / math.sqrt(3))),
    "rectangle 0.7": [(-0.5, -0.35), (0.5, -0.35), (0.5, 0.35), (-0.5, 0.35)],
    "ellipse 0.7": "ellipse 0.7",
}

OFF_PALETTE: dict[str, tuple[int, int, int]] = {
    "dark purple": (75, 25, 95),
    "deep purple": (60, 20, 80),
    "grey 128": (128, 128, 128),
    "grey 90": (90, 90, 90),
    "navy (21,42,147)": (21, 42, 147),
    "teal (14,130,140)": (14, 130, 140),
    "dark yellow (188,160,0)": (188, 160, 0),
}


def draw_object_image(shape: str, rgb: tuple[int, int, int], size: str = "large", cell: tuple[int, int] = (1, 1),
                      background: str = "white", resolution: int = 64, supersample: int = 4,
                      extra: tuple = ()) -> Image.Image:
    """An image in the world's style (supersampled, anti-aliased) with one object of ``shape`` — a world
    shape or one of :data:`FOREIGN_SHAPES` — in colour ``rgb``, plus ``extra`` world objects
    (``(shape, rgb, size, cell)`` tuples)."""
    big = resolution * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for name, colour, obj_size, obj_cell in ((shape, rgb, size, cell), *extra):
        width = SIZES[obj_size] * big / GRID
        cx, cy = ((obj_cell[1] + 0.5) * big / GRID, (obj_cell[0] + 0.5) * big / GRID)
        if name in SHAPES:
            from lit_star.worlds.shapes.world import draw_shape
            draw_shape(draw, name, (cx, cy), width, tuple(colour))
            continue
        outline = FOREIGN_SHAPES[name]
        if outline == "ellipse 0.7":
            draw.ellipse([cx - width / 2, cy - 0.35 * width, cx + width / 2, cy + 0.35 * width], fill=tuple(colour))
        else:
            draw.polygon([(cx + x * width, cy + y * width) for x, y in outline], fill=tuple(colour))
    return image.reduce(supersample)


# ------------------------------------------------------------------ measuring


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    array = np.asarray(values)
    return {"n": len(values), "min": float(array.min()), "p50": float(np.median(array)),
            "p99": float(np.quantile(array, 0.99)), "max": float(array.max())}


def ground_truth_records(world: Path, seed: int) -> list[tuple[str, dict, Path]]:
    """(set, scene record, image) of every ground-truth eval image of ``world``."""
    items = []
    eval_dir = world / "eval"
    for name, prompts, images in (("geneval", "geneval.jsonl", "geneval_gt"),
                                  ("geneval_seen", "geneval_seen.jsonl", "geneval_seen_gt"),
                                  ("knowledge", "knowledge.jsonl", "knowledge_gt")):
        if (eval_dir / prompts).is_file():
            items += [(name, r, eval_dir / images / f"{r['id']}.png") for r in load_prompts(eval_dir / prompts)]
    for r in load_prompts(eval_dir / "edit.jsonl"):
        items.append(("edit", r["target"], eval_dir / "edit_gt" / f"{r['id']}.png"))
    return items


def measure_ground_truth(items, degradations: dict) -> dict:
    """Per degradation: fit errors and colour distances of every ground-truth object, and misreadings."""
    out = {}
    for name, degrade in degradations.items():
        fit, colour, by_shape = [], [], defaultdict(list)
        misread, extra = [], 0
        for set_name, scene_meta, path in items:
            scene = Scene.from_meta(scene_meta)
            detection = detect_objects(degrade(Image.open(path).convert("RGB")), fit_error_limit=math.inf,
                                       colour_distance_limit=math.inf)
            cells = defaultdict(list)
            for o in detection.objects:
                cells[o.cell].append(o)
            extra += max(0, len(detection.objects) - len(scene.objects))
            for obj in scene.objects:
                found = sorted(cells.get(obj.cell, []), key=lambda o: -o.mass)
                if not found or (found[0].nearest_shape, found[0].nearest_color) != (obj.shape, obj.color):
                    misread.append(f"{path.name}: {obj.color} {obj.shape} at {obj.cell} read as "
                                   f"{[(o.nearest_color, o.nearest_shape) for o in found]}")
                    continue
                fit.append(found[0].fit_error)
                colour.append(found[0].color_distance)
                by_shape[f"{obj.shape} {obj.size}"].append(found[0].fit_error)
        out[name] = {"fit_error": _summary(fit), "color_distance": _summary(colour), "misread": misread[:20],
                     "misread_count": len(misread), "extra_objects": extra,
                     "fit_error_by_shape": {k: _summary(v)["max"] for k, v in sorted(by_shape.items())}}
    return out


def ground_truth_scores(world: Path, degradations: dict) -> dict:
    """ShapesEval scores (default thresholds) of the world's ground truth under each degradation: the
    lowest category score of each set."""
    out = {}
    eval_dir = world / "eval"
    for name, degrade in degradations.items():
        row = {}
        for set_name, prompts, images in (("geneval", "geneval.jsonl", "geneval_gt"),
                                          ("geneval_seen", "geneval_seen.jsonl", "geneval_seen_gt"),
                                          ("knowledge", "knowledge.jsonl", "knowledge_gt"), ("edit", "edit.jsonl", "edit_gt")):
            if not (eval_dir / prompts).is_file():
                continue
            records = load_prompts(eval_dir / prompts)
            loaded = {r["id"]: degrade(Image.open(eval_dir / images / f"{r['id']}.png").convert("RGB")) for r in records}
            result = (score_edits if set_name == "edit" else score_geneval)(records, loaded)
            row[set_name] = min(result["categories"].values())
        out[name] = row
    return out


def measure_foreign(degradations: dict, seed: int = 0, per_shape: int = 40) -> dict:
    """Fit errors of out-of-vocabulary shapes and colour distances of off-palette colours."""
    rng = random.Random(f"scorer_calibration:{seed}")
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    shapes_out: dict = {}
    for shape in FOREIGN_SHAPES:
        draws = [(rng.choice(list(COLORS)), rng.choice(list(SIZES)), rng.choice(cells), rng.choice(list(BACKGROUNDS)))
                 for _ in range(per_shape)]
        shapes_out[shape] = {}
        for name, degrade in degradations.items():
            errors, nearest = [], defaultdict(int)
            for colour, size, cell, background in draws:
                detection = detect_objects(degrade(draw_object_image(shape, COLORS[colour], size, cell, background)),
                                           fit_error_limit=math.inf, colour_distance_limit=math.inf)
                if detection.objects:
                    o = max(detection.objects, key=lambda o: o.mass)
                    errors.append(o.fit_error)
                    nearest[o.nearest_shape] += 1
            # named: taken for a world shape at the default threshold (a prompt with its colour would pass)
            shapes_out[shape][name] = {"fit_error": _summary(errors), "nearest": dict(nearest),
                                       "named": sum(e <= FIT_ERROR_LIMIT for e in errors), "of": len(draws)}
    colours_out: dict = {}
    for colour, rgb in OFF_PALETTE.items():
        draws = [(rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(cells), rng.choice(list(BACKGROUNDS)))
                 for _ in range(per_shape)]
        colours_out[colour] = {}
        for name, degrade in degradations.items():
            distances, fits, nearest, found = [], [], defaultdict(int), 0
            for shape, size, cell, background in draws:
                detection = detect_objects(degrade(draw_object_image(shape, rgb, size, cell, background)),
                                           fit_error_limit=math.inf, colour_distance_limit=math.inf)
                if detection.objects:
                    found += 1
                    o = max(detection.objects, key=lambda o: o.mass)
                    distances.append(o.color_distance)
                    fits.append(o.fit_error)
                    nearest[o.nearest_color] += 1
            named = sum(d <= COLOUR_DISTANCE_LIMIT and f <= FIT_ERROR_LIMIT for d, f in zip(distances, fits))
            colours_out[colour][name] = {"found": found, "of": len(draws), "color_distance": _summary(distances),
                                         "fit_error": _summary(fits), "nearest": dict(nearest), "named": named}
    return {"shapes": shapes_out, "colours": colours_out}


def run(seeds: list[int] = [0, 1], out: str | None = None, per_shape: int = 40,
        degradations: list[str] | None = None) -> int:
    """Measure the scorer's fit errors and colour distances on ground truth and out-of-vocabulary objects.

    Args:
        seeds: world seeds whose default eval sets (50 prompts per category, 30 edits, 100 riddles) are measured.
        out: write every number as JSON here.
        per_shape: random draws (colour, size, cell, background) per out-of-vocabulary shape or colour.
        degradations: subset of the degradations to run (default: all).
    """
    chosen = {k: v for k, v in DEGRADATIONS.items() if degradations is None or k in degradations}
    results: dict = {"ground_truth": {}, "foreign": measure_foreign(chosen, per_shape=per_shape)}
    tiny = dict(t2i_train=1, t2i_val=1, vqa_train=1, vqa_val=1, edit_train=1, edit_val=1, knowledge_train=1,
                knowledge_val=1)
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            world = Path(tmp) / "w"
            generate_world(world, WorldConfig(seed=seed, **tiny), progress=False)
            items = ground_truth_records(world, seed)
            if not (world / "eval" / "geneval_seen.jsonl").is_file():  # worlds written before the seen set
                for r in seen_combination_prompts(50, seed=seed):
                    path = Path(tmp) / f"{r['id']}.png"
                    render_scene(Scene.from_meta(r), 64).save(path)
                    items.append(("geneval_seen", r, path))
            results["ground_truth"][str(seed)] = measure_ground_truth(items, chosen)
            results.setdefault("ground_truth_scores", {})[str(seed)] = ground_truth_scores(world, chosen)
    print(format_calibration(results))
    write_json(results, out)
    return 0


def format_calibration(results: dict) -> str:
    lines = ["ground truth: max fit error / max colour distance (misread, extra objects) per degradation"]
    for seed, by_degradation in results["ground_truth"].items():
        for name, r in by_degradation.items():
            lines.append(f"  seed {seed} {name:<14} fit max {r['fit_error']['max']:.4f} p99 {r['fit_error']['p99']:.4f}"
                         f"  colour max {r['color_distance']['max']:5.1f} p99 {r['color_distance']['p99']:5.1f}"
                         f"  (n {r['fit_error']['n']}, misread {r['misread_count']}, extra {r['extra_objects']})")
    lines.append("ground truth: lowest category score per set at the default thresholds")
    for seed, by_degradation in results.get("ground_truth_scores", {}).items():
        for name, row in by_degradation.items():
            lines.append(f"  seed {seed} {name:<14} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    lines.append(f"out-of-vocabulary shapes: min / median fit error (taken for a world shape at {FIT_ERROR_LIMIT} / "
                 "drawn) per degradation")
    for shape, by_degradation in results["foreign"]["shapes"].items():
        lines.append(f"  {shape:<22}" + "  ".join(
            f"{name} {r['fit_error'].get('min', float('nan')):.4f}/{r['fit_error'].get('p50', float('nan')):.4f}"
            f" ({r['named']}/{r['of']})" for name, r in by_degradation.items()))
    lines.append(f"off-palette colours: min colour distance (found / drawn, named a palette colour and shape at "
                 f"{COLOUR_DISTANCE_LIMIT}) per degradation")
    for colour, by_degradation in results["foreign"]["colours"].items():
        lines.append(f"  {colour:<24}" + "  ".join(
            f"{name} {r['color_distance'].get('min', float('nan')):.1f} ({r['found']}/{r['of']}, {r['named']})"
            for name, r in by_degradation.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(command_line(run))
