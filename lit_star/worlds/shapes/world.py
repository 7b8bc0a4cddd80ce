"""The Shapes world itself: vocabulary, scenes, rendering and the language that describes them.

Pure functions with no I/O. :mod:`lit_star.worlds.shapes.generator` samples scenes and writes shards;
:mod:`lit_star.worlds.shapes.scorer` reads images back with the same vocabulary and geometry.
Documented in ``docs/shapes_world.md``.

    from lit_star.worlds.shapes.world import Scene, WorldObject, render_scene
    img = render_scene(Scene("white", (WorldObject("triangle", "yellow", "large", (1, 1)),)), resolution=64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SCHEMA_VERSION = 1

GENEVAL_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
EDIT_CATEGORIES = ("add", "remove", "replace", "adjust", "background", "move")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "hexagon": "hexagons"}

# Chosen so that every object colour is far from every other one *and* from every blend of another
# object colour with a background (anti-aliased edges must not look like a third colour).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (235, 200, 0),
    "green": (30, 150, 50),
    "cyan": (20, 185, 200),
    "blue": (30, 60, 210),
    "purple": (130, 50, 170),
    "pink": (240, 110, 180),
    "brown": (135, 80, 30),
    "black": (25, 25, 25),
}
# Light backgrounds, all well above yellow in luma: JPEG keeps only luma at full resolution.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (228, 228, 228),
    "beige": (245, 236, 210),
    "light blue": (218, 234, 250),
}

# Object bounding-box width as a fraction of a grid cell. Large objects leave >= 20% of a cell free
# between neighbours so that two same-coloured objects stay apart even after a 2 px blur.
SIZES: dict[str, float] = {"small": 0.56, "large": 0.78}
GRID = 3
HEXAGON_ASPECT = 0.7  # height / width
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top center", (0, 2): "top right",
    (1, 0): "center left", (1, 1): "center", (1, 2): "center right",
    (2, 0): "bottom left", (2, 1): "bottom center", (2, 2): "bottom right",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

# (colour, shape) combinations that never appear in any training sample (images or text) and that
# every evaluation prompt uses: each colour once, each shape twice.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("orange", "hexagon"), ("yellow", "circle"), ("green", "square"), ("cyan", "triangle"),
    ("blue", "hexagon"), ("purple", "star"), ("pink", "circle"), ("brown", "square"), ("black", "triangle"),
)

# The fixed hint vocabulary of the riddles (world knowledge). Each hint names exactly one value.
COLOR_HINTS: dict[str, tuple[str, ...]] = {
    "red": ("coloured like a ripe strawberry", "the colour of a fire engine"),
    "orange": ("coloured like a pumpkin", "the colour of a carrot"),
    "yellow": ("coloured like a ripe banana", "the colour of a lemon"),
    "green": ("coloured like fresh grass", "the colour of a lime"),
    "cyan": ("coloured like a tropical lagoon", "the colour of turquoise"),
    "blue": ("coloured like a sapphire", "the colour of a blueberry"),
    "purple": ("coloured like an aubergine", "the colour of lavender flowers"),
    "pink": ("coloured like a flamingo", "the colour of candy floss"),
    "brown": ("coloured like chocolate", "the colour of tree bark"),
    "black": ("coloured like coal", "the colour of the night sky"),
}
# (singular, plural) hint pairs so counting riddles read naturally.
SHAPE_HINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("the round shape with no corners", "round shapes with no corners"),
               ("the shape of a full moon", "shapes like a full moon")),
    "square": (("the shape with four equal sides and four right angles", "shapes with four equal sides and four right angles"),
               ("the shape of a chessboard tile", "shapes like chessboard tiles")),
    "triangle": (("the shape with three corners", "shapes with three corners"),
                 ("the shape of a yield sign", "shapes like yield signs")),
    "star": (("the shape with five points", "shapes with five points"),
             ("the shape of a sheriff's badge", "shapes like sheriff's badges")),
    "hexagon": (("the shape with six sides", "shapes with six sides"),
                ("the shape of a honeycomb cell", "shapes like honeycomb cells")),
}
COUNT_HINTS: dict[int, tuple[str, ...]] = {
    2: ("as many as the wheels of a bicycle", "as many as the eyes of a cat"),
    3: ("as many as the wheels of a tricycle", "as many as the primary colours"),
    4: ("as many as the legs of a dog", "as many as the seasons of a year"),
}


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]

    @property
    def description(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]

    def to_meta(self, resolution: int) -> dict:
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "cell": list(o.cell),
                 "bbox": [round(v, 2) for v in object_bbox(o, resolution)]}
                for o in self.objects
            ],
        }

    @classmethod
    def from_meta(cls, meta: dict) -> "Scene":
        try:
            objects = tuple(
                WorldObject(o["shape"], o["color"], o["size"], (int(o["cell"][0]), int(o["cell"][1])))
                for o in meta["objects"]
            )
            scene = cls(meta["background"], objects)
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"scene metadata lacks a field or has a bad one ({err!r}): {meta}") from err
        validate_scene(scene)
        return scene

    def without(self, index: int) -> "Scene":
        return replace(self, objects=self.objects[:index] + self.objects[index + 1:])

    def with_object(self, index: int, obj: WorldObject) -> "Scene":
        return replace(self, objects=self.objects[:index] + (obj,) + self.objects[index + 1:])

    def occupied_cells(self) -> set[tuple[int, int]]:
        return {o.cell for o in self.objects}


def validate_scene(scene: Scene) -> None:
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; known: {sorted(BACKGROUNDS)}")
    for o in scene.objects:
        if o.shape not in SHAPES:
            raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
        if o.color not in COLORS:
            raise ValueError(f"unknown colour {o.color!r}; known: {sorted(COLORS)}")
        if o.size not in SIZES:
            raise ValueError(f"unknown size {o.size!r}; known: {sorted(SIZES)}")
        if o.cell not in CELL_NAMES:
            raise ValueError(f"cell {o.cell} is off the {GRID}x{GRID} grid")
    if len(scene.occupied_cells()) != len(scene.objects):
        raise ValueError(f"two objects share a cell: {scene.objects}")


def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT_COMBOS


# ---------------------------------------------------------------- geometry and rendering


def unit_outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of ``shape`` with its bounding box exactly [-0.5, 0.5] wide, centred vertically; None for the circle."""
    if shape == "square":
        return [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    if shape == "triangle":  # equilateral, apex up
        h = math.sqrt(3) / 2
        return [(0.0, -h / 2), (0.5, h / 2), (-0.5, h / 2)]
    if shape == "hexagon":
        # Flat top and bottom and squashed to 0.7 of its width (a regular one is 0.87): at 64 px and a
        # 1-2 px blur the six corners of a small regular hexagon vanish and it becomes a circle, while
        # the squash survives, so this is what tells the two apart.
        h = HEXAGON_ASPECT
        return [(0.5, 0.0), (0.25, h / 2), (-0.25, h / 2), (-0.5, 0.0), (-0.25, -h / 2), (0.25, -h / 2)]
    if shape == "star":  # five points, apex up; a fat inner radius keeps the arms visible at 64 px
        inner = 0.5
        pts = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((radius * math.cos(angle), radius * math.sin(angle)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        scale = 1.0 / (max(xs) - min(xs))
        y_mid = (max(ys) + min(ys)) / 2
        return [(x * scale, (y - y_mid) * scale) for x, y in pts]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


UNIT_OUTLINES = {shape: unit_outline(shape) for shape in SHAPES}


def _unit_height(shape: str) -> float:
    outline = UNIT_OUTLINES[shape]
    return 1.0 if outline is None else max(p[1] for p in outline) - min(p[1] for p in outline)


def object_center(obj: WorldObject, resolution: int) -> tuple[float, float]:
    cell = resolution / GRID
    return (obj.cell[1] + 0.5) * cell, (obj.cell[0] + 0.5) * cell


def object_bbox(obj: WorldObject, resolution: int) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] in pixels of an image ``resolution`` wide."""
    cx, cy = object_center(obj, resolution)
    width = SIZES[obj.size] * resolution / GRID
    height = width * _unit_height(obj.shape)
    return cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], width: float, fill) -> None:
    """Draw ``shape`` with bounding-box width ``width`` and bounding-box centre ``center``."""
    cx, cy = center
    outline = UNIT_OUTLINES[shape]
    if outline is None:
        draw.ellipse([cx - width / 2, cy - width / 2, cx + width / 2, cy + width / 2], fill=fill)
    else:
        draw.polygon([(cx + x * width, cy + y * width) for x, y in outline], fill=fill)


def render_scene(scene: Scene, resolution: int = 64, supersample: int = 4) -> Image.Image:
    """Draw at ``supersample`` x the resolution and average each block, so edges are anti-aliased blends."""
    big = resolution * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy = (v * supersample for v in object_center(obj, resolution))
        draw_shape(draw, obj.shape, (cx, cy), SIZES[obj.size] * big / GRID, COLORS[obj.color])
    if supersample == 1:
        return image
    return image.reduce(supersample)


# ---------------------------------------------------------------- relations


def relations_between(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """Relations of box A relative to box B by GenEval's rule.

    The centre offset is shrunk on each axis by ``threshold`` x the summed box sizes along it, then
    divided by the unshrunk offset length; a component beyond 0.5 makes the relation hold.
    """
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    dx, dy = ax - bx, ay - by
    norm = math.hypot(dx, dy)
    if norm == 0:
        return set()
    size_x = (box_a[2] - box_a[0]) + (box_b[2] - box_b[0])
    size_y = (box_a[3] - box_a[1]) + (box_b[3] - box_b[1])
    rx = math.copysign(max(abs(dx) - threshold * size_x, 0.0), dx) / norm
    ry = math.copysign(max(abs(dy) - threshold * size_y, 0.0), dy) / norm
    found = set()
    if rx < -0.5:
        found.add("left of")
    if rx > 0.5:
        found.add("right of")
    if ry < -0.5:
        found.add("above")
    if ry > 0.5:
        found.add("below")
    return found


def scene_relations(a: WorldObject, b: WorldObject, resolution: int) -> set[str]:
    return relations_between(object_bbox(a, resolution), object_bbox(b, resolution))


# ---------------------------------------------------------------- language


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(color: str, shape: str, count: int = 1, size: str | None = None) -> str:
    """``a red circle``, ``an orange star``, ``three green triangles``, ``a small blue square``."""
    adjectives = f"{size} {color}" if size else color
    if count == 1:
        return f"{_article(adjectives)} {adjectives} {shape}"
    return f"{COUNT_WORDS[count]} {adjectives} {SHAPE_PLURALS[shape]}"


def one_attribute_phrase(color: str | None = None, shape: str | None = None) -> str:
    """``a red object`` or ``a star``: one object named by exactly one of its colour and shape."""
    if (color is None) == (shape is None):
        raise ValueError(f"name exactly one of colour and shape, got colour={color!r}, shape={shape!r}")
    words = f"{color} object" if color else shape
    return f"{_article(words)} {words}"


def dpg_description(scene: Scene) -> str:
    """Long description naming every object with its size and place, and the background.

    Objects are listed in reading order (by row, then column), whatever order the scene holds them in:
    the image shows no other order, so a description in placement order could not be read off it.
    """
    parts = [f"{noun_phrase(o.color, o.shape, size=o.size)} at the {CELL_NAMES[o.cell]}"
             for o in sorted(scene.objects, key=lambda o: o.cell)]
    if not parts:
        listing = "nothing else"
    elif len(parts) == 1:
        listing = parts[0]
    else:
        listing = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"A {scene.background} background with {listing}."
