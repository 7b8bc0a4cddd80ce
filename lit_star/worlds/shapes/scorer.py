"""ShapesEval's scorer: images of the Shapes world against prompt metadata, GenEval-style and for edits.

The command is ``python -m lit_star eval shapes`` (:mod:`lit_star.eval.shapes`).
Images are named ``<id>.png`` (``.jpg``/``.jpeg``/``.webp`` also accepted). Objects are found without any
learned model:

1. the background colour is the median of the image border;
2. every pixel is explained as a blend ``bg + alpha * (colour - bg)`` of the background with each palette
   colour; a pixel belongs to the colour with the smallest blend residual if its alpha is at least 0.5.
   Anti-aliased or blurred edges are blends, so they are assigned to the right colour and not to a third
   one lying near the blend (red on white is not pink);
3. connected components of each colour are objects; one touching a larger one is a fringe of it (world
   objects never touch) and joins it, and one under 0.25% of the image is noise;
4. the shape is the outline that best fits the object's soft alpha map in the least-squares sense, over
   the five shapes and a few blur widths, with scale set by the alpha mass and position by its centroid.

GenEval's rules then decide each prompt (see :func:`score_geneval_prompt`); an edit is right when the
edited cells match the target scene and every other cell and the background are unchanged.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from lit_star.data.jsonl import read_jsonl
from lit_star.worlds.shapes.world import (
    BACKGROUNDS,
    COLORS,
    EDIT_CATEGORIES,
    GENEVAL_CATEGORIES,
    GRID,
    SHAPES,
    UNIT_OUTLINES,
    Scene,
    draw_shape,
    relations_between,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[n] for n in _BACKGROUND_NAMES], dtype=np.float32)

# A colour closer than this to the background cannot be told from it (RGB distance, 0-255 scale).
_MIN_CONTRAST = 45.0
# Largest distance of a pixel from the background-to-colour blend line that still counts as that colour.
_MAX_BLEND_RESIDUAL = 60.0
# Background names are given only to a border colour this close to one of the world's backgrounds.
_MAX_BACKGROUND_DISTANCE = 40.0
_BLUR_WIDTHS = (0.0, 0.5, 0.8, 1.1, 1.4, 1.7, 2.0, 2.4)
_MISFIT_SMOOTHING = _BLUR_WIDTHS.index(0.8)
# A pixel at least this far from the background (RGB) that no palette blend explains is of an unknown colour.
_MIN_FOREGROUND_DISTANCE = 45.0

# The name of a shape or colour that the scorer cannot recognise; it matches no prompt.
UNKNOWN = "unknown"
# An object whose best outline misfits by more than this (squared error per unit alpha mass) is an unknown
# shape; one whose estimated colour is further than this (RGB) from its palette colour is an unknown colour.
# Calibrated on the world's ground truth, clean and degraded (docs/shapes_eval.md, "2026-12-05";
# python -m lit_star.experiments.scorer_calibration).
FIT_ERROR_LIMIT = 0.015
COLOUR_DISTANCE_LIMIT = 54.0


@dataclass
class DetectedObject:
    shape: str
    color: str
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 pixel edges of the alpha >= 0.5 region
    centroid: tuple[float, float]
    mass: float  # sum of alpha: the object's area in pixels, unchanged by blur
    cell: tuple[int, int]
    fit_error: float  # squared misfit of the best outline (residual smoothed by 0.8 px) per unit of alpha mass
    nearest_shape: str = ""  # the best-fitting outline, also when it fits too badly to name the shape
    nearest_color: str = ""  # the palette colour the object was assigned, also when too far to name it
    color_distance: float = 0.0  # RGB distance of the estimated colour from ``nearest_color``
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the estimated (deblurred) object colour

    @property
    def recognised(self) -> bool:
        return self.shape != UNKNOWN and self.color != UNKNOWN

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "cell": list(self.cell),
                "bbox": [round(v, 2) for v in self.bbox], "mass": round(self.mass, 1), "fit_error": round(self.fit_error, 3),
                "nearest_shape": self.nearest_shape, "nearest_color": self.nearest_color,
                "color_distance": round(self.color_distance, 1), "rgb": [round(v, 1) for v in self.rgb]}


@dataclass
class Detection:
    background: str | None
    background_rgb: tuple[float, float, float]
    objects: list[DetectedObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}


# ---------------------------------------------------------------- detection


def _to_array(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            image = img.convert("RGB")
    elif isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    return arr


def _border_median(arr: np.ndarray, width: int = 2) -> np.ndarray:
    frame = np.concatenate([arr[:width].reshape(-1, 3), arr[-width:].reshape(-1, 3),
                            arr[:, :width].reshape(-1, 3), arr[:, -width:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def _unit_area_and_centroid(shape: str) -> tuple[float, tuple[float, float]]:
    """Area and centroid (relative to the bbox centre) of ``shape`` at unit bbox width."""
    outline = UNIT_OUTLINES[shape]
    if outline is None:
        return math.pi / 4, (0.0, 0.0)
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(outline, outline[1:] + outline[:1]):
        cross = x0 * y1 - x1 * y0
        area += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    area /= 2
    return abs(area), (cx / (6 * area), cy / (6 * area))


_UNIT_GEOMETRY = {shape: _unit_area_and_centroid(shape) for shape in SHAPES}


def _render_template(shape: str, width: float, center: tuple[float, float], patch_hw: tuple[int, int],
                     supersample: int = 4) -> np.ndarray:
    """Coverage (0..1) of ``shape`` with bbox width ``width`` and bbox centre ``center`` on a pixel grid."""
    h, w = patch_hw
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (center[0] * supersample, center[1] * supersample),
               width * supersample, 255)
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255.0


def _fit_shape(soft: np.ndarray, centroid: tuple[float, float], mass: float) -> tuple[str, float, np.ndarray]:
    """Least-squares fit of every shape outline (and blur width) to the soft alpha patch ``soft``: the best
    shape, its squared error per unit of alpha mass, and its (blurred) template."""
    best_shape, best_error, best_template = SHAPES[0], math.inf, np.zeros_like(soft)
    for shape in SHAPES:
        unit_area, (ux, uy) = _UNIT_GEOMETRY[shape]
        width = math.sqrt(max(mass, 1e-6) / unit_area)
        # pixel (i, j) covers [j, j+1) x [i, i+1), so the centroid of alpha is measured at pixel centres + 0.5
        center = (centroid[0] + 0.5 - ux * width, centroid[1] + 0.5 - uy * width)
        template = _render_template(shape, width, center, soft.shape)
        blurred = _blur_rows(soft.shape[0]) @ template @ _blur_rows(soft.shape[1]).transpose(0, 2, 1)
        errors = ((blurred - soft) ** 2).sum((1, 2))
        index = int(errors.argmin())
        if errors[index] < best_error:
            best_shape, best_error, best_template = shape, float(errors[index]), blurred[index]
    # The misfit that says whether the shape is known at all is measured on the residual smoothed by a
    # 0.8 px Gaussian: JPEG's ringing alternates in sign from pixel to pixel and mostly cancels, while a
    # wrong outline (a pentagon's corners outside a circle) leaves same-signed patches that survive.
    smooth = _blur_rows(soft.shape[0])[_MISFIT_SMOOTHING], _blur_rows(soft.shape[1])[_MISFIT_SMOOTHING]
    residual = smooth[0] @ (best_template - soft) @ smooth[1].T
    return best_shape, float((residual ** 2).sum()) / max(mass, 1e-6), best_template


@functools.lru_cache(maxsize=512)
def _blur_rows(n: int) -> np.ndarray:
    """(len(_BLUR_WIDTHS), n, n) matrices applying a zero-padded 1-D Gaussian blur of each width."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    matrices = []
    for sigma in _BLUR_WIDTHS:
        if sigma == 0:
            matrices.append(np.eye(n, dtype=np.float32))
            continue
        radius = int(4 * sigma + 0.5)
        norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        kernel = np.where(np.abs(offsets) <= radius, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0) / norm
        matrices.append(kernel.astype(np.float32))
    return np.stack(matrices)


# RGB -> YCbCr (without offsets). JPEG keeps chroma at half resolution, so the alpha map that the shape is
# fitted to leans on luma, which keeps the edges sharp, and uses chroma only where luma cannot tell.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32)
_YCBCR_WEIGHTS = np.array([1.0, 0.1, 0.1], dtype=np.float32)


def _luma_weighted_alpha(offset: np.ndarray, direction: np.ndarray) -> np.ndarray:
    d = _YCBCR @ direction
    weighted = _YCBCR_WEIGHTS * d
    return (offset @ _YCBCR.T @ weighted) / float(d @ weighted)


def _cell_of(bbox, height: int, width: int, grid: int) -> tuple[int, int]:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    row = min(grid - 1, max(0, int(cy / (height / grid))))
    col = min(grid - 1, max(0, int(cx / (width / grid))))
    return row, col


def _dominant_colour(offsets: np.ndarray, directions: np.ndarray, visible: np.ndarray, fallback: int) -> int:
    """Palette colour whose background blend best explains the mean of an object's pixels."""
    mean = offsets.mean(0)
    norms2 = np.maximum((directions ** 2).sum(1), 1e-6)
    alpha = directions @ mean / norms2
    residual = (mean ** 2).sum() - alpha * (directions @ mean)
    residual = np.where(visible & (alpha > 0.1), residual, np.inf)
    return int(residual.argmin()) if np.isfinite(residual).any() else fallback


def _objects_from_labels(label: np.ndarray, min_area: int, faint: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Connected components of each colour label -> (object id map, colour index of each id).

    World objects never touch, so a component touching a larger one is an artefact of its edge (JPEG
    chroma bleeding makes part of a small black shape look brown) and joins it; what is left below
    ``min_area`` pixels is noise. The colour of a joined object is decided again afterwards.
    Components of the ``faint`` label come last and only stand alone: one touching an object is its
    blurred rim (and may bridge two neighbours), so it is left out; one on its own is a faint object.
    """
    parts = []
    for k in np.unique(label[label >= 0]):
        labelled, n = ndimage.label(label == k)
        for index, window in enumerate(ndimage.find_objects(labelled), start=1):
            mask = labelled[window] == index
            parts.append((int(mask.sum()), int(k), window, mask))
    parts.sort(key=lambda p: (p[1] == faint, -p[0]))

    ids = np.zeros(label.shape, dtype=np.int32)
    colours: list[int] = []
    areas: list[int] = []
    for area, k, window, mask in parts:
        grown = (slice(max(window[0].start - 1, 0), window[0].stop + 1),
                 slice(max(window[1].start - 1, 0), window[1].stop + 1))
        local = np.zeros(ids[grown].shape, dtype=bool)
        local[window[0].start - grown[0].start:window[0].stop - grown[0].start,
              window[1].start - grown[1].start:window[1].stop - grown[1].start] = mask
        touching = np.unique(ids[grown][ndimage.binary_dilation(local, np.ones((3, 3), bool))])
        touching = [t for t in touching if t > 0]
        if touching and k == faint:
            continue
        if touching:
            owner = max(touching, key=lambda t: areas[t - 1])
        elif area >= min_area:
            colours.append(k)
            areas.append(0)
            owner = len(colours)
        else:
            continue
        ids[window][mask] = owner
        areas[owner - 1] += area
    return ids, colours


def _object_direction(offsets: np.ndarray) -> np.ndarray:
    """Colour offset from the background of an object no palette colour explains: the mean of its
    strongest quarter of pixels (its core rather than its anti-aliased rim)."""
    norms = np.linalg.norm(offsets, axis=1)
    core = offsets[norms >= np.quantile(norms, 0.75)]
    return core.mean(0)


def detect_objects(image, grid: int = GRID, fit_error_limit: float | None = None,
                   colour_distance_limit: float | None = None) -> Detection:
    """Find the coloured objects of a Shapes-world image (a path, PIL image or H x W x 3 array).

    An object whose best outline fits worse than ``fit_error_limit`` (default :data:`FIT_ERROR_LIMIT`)
    has shape ``"unknown"``; one whose estimated colour lies further than ``colour_distance_limit``
    (default :data:`COLOUR_DISTANCE_LIMIT`) from its palette colour has colour ``"unknown"``.
    Pass ``math.inf`` for either to get the nearest name regardless (the calibration does).
    """
    fit_error_limit = FIT_ERROR_LIMIT if fit_error_limit is None else fit_error_limit
    colour_distance_limit = COLOUR_DISTANCE_LIMIT if colour_distance_limit is None else colour_distance_limit
    arr = _to_array(image)
    height, width = arr.shape[:2]
    bg = _border_median(arr)
    bg_dist = np.linalg.norm(_BACKGROUND_RGB - bg, axis=1)
    background = _BACKGROUND_NAMES[int(bg_dist.argmin())] if bg_dist.min() <= _MAX_BACKGROUND_DISTANCE else None

    directions = _PALETTE - bg  # K x 3
    norms2 = (directions ** 2).sum(1)
    visible = norms2 > _MIN_CONTRAST ** 2
    offset = arr - bg  # H x W x 3
    along = offset @ directions.T  # H x W x K
    alpha = along / np.maximum(norms2, 1e-6)
    residual = np.sqrt(np.maximum((offset ** 2).sum(-1, keepdims=True) - along * alpha, 0.0))
    # The colour is the best blend explanation among all colours present at all; only then is alpha
    # thresholded, so a faint orange edge is not taken for a strong yellow one.
    candidate = visible & (alpha > 0.1)
    best = np.where(candidate, residual, np.inf).argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    explained = candidate.any(-1) & (best_residual <= _MAX_BLEND_RESIDUAL)
    label = np.where(explained & (best_alpha >= 0.5), best, -1)
    # Pixels far from the background that no palette colour explains are of an unknown colour (label K),
    # and those that are only faint blends of one (alpha < 0.5) are faint (label K + 1): objects of such
    # colours are found and counted, not dropped (a navy or teal shape, or a grey one on a grey ground, is
    # an object, not background). Faint pixels next to an object are its rim and are left out.
    unknown, faint = len(_PALETTE_NAMES), len(_PALETTE_NAMES) + 1
    far = np.linalg.norm(offset, axis=-1) >= _MIN_FOREGROUND_DISTANCE
    label = np.where(far & ~explained, unknown, label)
    label = np.where(far & explained & (label < 0), faint, label)

    min_area = max(4, round(0.0025 * height * width))
    ids, colours = _objects_from_labels(label, min_area, faint)
    colours = [unknown if k == faint else k for k in colours]
    if not colours:
        return Detection(background, tuple(float(v) for v in bg))

    # Each pixel near objects belongs to its nearest object, so blurred halos of neighbours don't mix.
    distance, (near_r, near_c) = ndimage.distance_transform_edt(ids == 0, return_indices=True)
    nearest = ids[near_r, near_c]
    halo = max(4, round(width / 16))

    objects = []
    for i, k in enumerate(colours, start=1):
        mask = ids == i
        k = _dominant_colour(offset[mask], directions, visible, fallback=k if k != unknown else -1)
        direction = directions[k] if k >= 0 else _object_direction(offset[mask])
        # The box is that of the palette-coloured pixels when there are any: unknown pixels that joined the
        # object are JPEG fringes of it.
        known = mask & (label < unknown)
        rows, cols = np.nonzero(known if known.any() else mask)
        y0, y1 = max(rows.min() - halo, 0), min(rows.max() + halo + 1, height)
        x0, x1 = max(cols.min() - halo, 0), min(cols.max() + halo + 1, width)
        window = (slice(y0, y1), slice(x0, x1))
        region = (nearest[window] == i) & (distance[window] <= halo)
        # Stray pixels given another colour (JPEG chroma bleeding at edges) still count here; only
        # pixels of another real object are left out.
        region &= (ids[window] == 0) | (ids[window] == i)
        # Clip only far outliers: clipping at 0 would turn JPEG noise into a positive bias on the mass.
        sharp_alpha = _luma_weighted_alpha(offset[window], direction)
        soft = np.where(region, np.clip(sharp_alpha, -0.25, 1.25), 0.0).astype(np.float32)
        mass = float(soft.sum())
        if mass < min_area / 2:
            continue
        yy, xx = np.mgrid[0:y1 - y0, 0:x1 - x0]
        centroid = (float((soft * xx).sum() / mass), float((soft * yy).sum() / mass))
        shape, error, template = _fit_shape(soft, centroid, mass)
        rgb = _object_colour(offset[window], template * region, bg)
        colour_name, colour_distance = _name_colour(rgb, k)
        bbox = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        objects.append(DetectedObject(
            shape=shape if error <= fit_error_limit else UNKNOWN,
            color=colour_name if colour_distance <= colour_distance_limit else UNKNOWN, bbox=bbox,
            centroid=(centroid[0] + x0 + 0.5, centroid[1] + y0 + 0.5), mass=mass,
            cell=_cell_of(bbox, height, width, grid), fit_error=error,
            nearest_shape=shape, nearest_color=colour_name, color_distance=colour_distance,
            rgb=tuple(float(v) for v in rgb),
        ))
    objects.sort(key=lambda o: (o.cell, -o.mass))
    return Detection(background, tuple(float(v) for v in bg), objects)


def _object_colour(offsets: np.ndarray, template: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The object's own colour, deblurred: the least-squares amplitude of each RGB channel's offset from the
    background against the fitted (blurred) outline, over the outline's core (where it is at least 0.9 of
    its peak). A solid palette object gives its palette colour even when blurred; a faint one (grey, a
    light tint) gives its faintness, which its alpha map alone hides (the outline is fitted to the mass)."""
    core = template >= 0.9 * float(template.max(initial=0.0))
    weight = float((template[core] ** 2).sum())
    if weight <= 1e-6:
        return bg.copy()
    return np.clip(bg + (template[core][:, None] * offsets[core]).sum(0) / weight, 0.0, 255.0)


def _name_colour(rgb: np.ndarray, k: int) -> tuple[str, float]:
    """The palette colour the object was assigned (or, with none, the nearest) and its RGB distance to ``rgb``."""
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)
    if k < 0:
        k = int(distances.argmin())
    return _PALETTE_NAMES[k], float(distances[k])


# ---------------------------------------------------------------- GenEval-style rules


def _describe(req: Mapping) -> str:
    return f"{req.get('color', '')} {req['shape']}".strip()


def _matching(objects: list[DetectedObject], req: Mapping, unknown_matches: bool = False) -> list[DetectedObject]:
    """Objects that are ``req``'s shape and colour; with ``unknown_matches``, also those whose shape or colour
    is unknown (they might be one: counted against an ``exclude`` entry)."""
    def fits(value: str, wanted: str | None) -> bool:
        return wanted is None or value == wanted or (unknown_matches and value == UNKNOWN)

    found = [o for o in objects if fits(o.shape, req.get("shape")) and fits(o.color, req.get("color"))]
    return sorted(found, key=lambda o: -o.mass)


def score_geneval_prompt(meta: Mapping, detection: Detection) -> tuple[bool, str]:
    """GenEval's rule on one prompt: every ``include`` entry is found ``count`` times (the largest
    instances stand for it, like GenEval's most confident boxes), with its ``position`` relative to an
    earlier entry holding for every pair; no ``exclude`` entry is found ``count`` times or more, counting
    unrecognised objects (unknown shape or colour) that could be one: three red circles and a red blob are
    not "three red circles"."""
    groups: list[list[DetectedObject]] = []
    for req in meta["include"]:
        count = int(req.get("count", 1))
        found = _matching(detection.objects, req)
        if len(found) < count:
            return False, f"expected {count} {_describe(req)}, found {len(found)}"
        chosen = found[:count]
        if "position" in req:
            relation, target = req["position"]
            for a in chosen:
                for b in groups[target]:
                    if relation not in relations_between(a.bbox, b.bbox):
                        return False, f"{_describe(req)} is not {relation} {_describe(meta['include'][target])}"
        groups.append(chosen)
    for req in meta.get("exclude", []):
        found = _matching(detection.objects, req, unknown_matches=True)
        if len(found) >= int(req["count"]):
            return False, f"expected fewer than {req['count']} {_describe(req)}, found {len(found)}"
    return True, ""


# ---------------------------------------------------------------- edits


def _cell_contents(objects: Iterable) -> dict[tuple[int, int], list[tuple[str, str]]]:
    cells: dict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    for o in objects:
        cells[tuple(o.cell)].append((o.shape, o.color))
    return cells


def score_edit_pair(meta: Mapping, detection: Detection) -> tuple[bool, bool, str]:
    """(instruction satisfied, rest preserved, reason) for one edit pair.

    The edited cells are those where source and target scenes differ; each must hold exactly the
    target's object (or nothing). Every other cell must still hold exactly what it held, and the
    background must be the target's.
    """
    source, target = Scene.from_meta(meta["source"]), Scene.from_meta(meta["target"])
    before, after = _cell_contents(source.objects), _cell_contents(target.objects)
    seen = _cell_contents(detection.objects)
    edited = {c for c in set(before) | set(after) if before.get(c, []) != after.get(c, [])}
    background_edited = source.background != target.background

    satisfied, preserved, reasons = True, True, []
    for cell in sorted(set(after) | set(seen) | edited):
        want, got = sorted(after.get(cell, [])), sorted(seen.get(cell, []))
        if want != got:
            if cell in edited:
                satisfied = False
            else:
                preserved = False
            reasons.append(f"cell {list(cell)}: expected {want or 'nothing'}, found {got or 'nothing'}")
    if detection.background != target.background:
        if background_edited:
            satisfied = False
        else:
            preserved = False
        reasons.append(f"background: expected {target.background}, found {detection.background}")
    return satisfied, preserved, "; ".join(reasons)


# ---------------------------------------------------------------- batch scoring


def load_prompts(path: str | Path) -> list[dict]:
    def check(record: dict) -> str | None:
        missing = [key for key in ("id", "category") if key not in record]
        return f"record lacks {missing[0]!r}" if missing else None

    return read_jsonl(path, check)


def _find_image(images: str | Path | Mapping, prompt_id: str):
    if isinstance(images, Mapping):
        return images.get(prompt_id)
    for suffix in IMAGE_SUFFIXES:
        candidate = Path(images) / f"{prompt_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _detect_or_reason(images, prompt_id: str) -> tuple[Detection | None, str]:
    image = _find_image(images, prompt_id)
    if image is None:
        return None, "missing image"
    try:
        return detect_objects(image), ""
    except (OSError, ValueError) as err:
        return None, f"unreadable image: {err}"


def overall_standard_error(categories: dict[str, float], counts: dict[str, int]) -> float:
    """The binomial standard error of the overall score (the mean of the category scores), from the
    prompts per category: about how far another sampler seed moves it (docs/sampler.md, "How much of a ShapesEval difference is the sampler's seed")."""
    if not categories:
        return 0.0
    variance = sum(p * (1 - p) / counts[c] for c, p in categories.items()) / len(categories) ** 2
    return float(variance ** 0.5)


def _summarise(task: str, order: tuple[str, ...], rows: list[dict], extra_keys: tuple[str, ...] = ()) -> dict:
    per_category: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        per_category[row["category"]].append(row)
    names = [c for c in order if c in per_category] + sorted(set(per_category) - set(order))
    categories = {c: float(np.mean([r["correct"] for r in per_category[c]])) for c in names}
    counts = {c: len(per_category[c]) for c in names}
    result = {
        "task": task,
        "overall": float(np.mean(list(categories.values()))),
        "overall_standard_error": overall_standard_error(categories, counts),
        "categories": categories,
        "counts": counts,
        "missing": [r["id"] for r in rows if r["detected"] is None],
        "per_prompt": rows,
    }
    for key in extra_keys:
        result[key] = {c: float(np.mean([r[key] for r in per_category[c]])) for c in names}
    return result


def _as_records(prompts) -> list[dict]:
    records = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    if not records:
        raise ValueError("no prompts to score")
    return records


def _require(meta: Mapping, keys: tuple[str, ...], task: str) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"{task} record {meta.get('id', '?')!r} lacks {missing}")


def score_geneval(prompts, images) -> dict:
    """Score GenEval-style ``prompts`` (JSONL path or records) against ``images`` (folder or id -> image)."""
    rows = []
    for meta in _as_records(prompts):
        _require(meta, ("id", "category", "include"), "GenEval-style")
        detection, reason = _detect_or_reason(images, meta["id"])
        correct, row = False, {}
        if detection is not None:
            correct, reason = score_geneval_prompt(meta, detection)
            row["objects"] = len(detection.objects)
            if meta["category"] in WRONG_SHAPE_CATEGORIES and len(meta["include"]) == 1:
                row["wrong_shape"] = wrong_shape_rate(meta, detection)
        rows.append({"id": meta["id"], "category": meta["category"], "correct": bool(correct), "reason": reason,
                     **row, "detected": detection.to_dict() if detection else None})
    result = _summarise("geneval", GENEVAL_CATEGORIES, rows)
    result["objects_per_image"] = _category_means(rows, "objects", result["categories"])
    result["wrong_shape_baseline"] = _category_means(rows, "wrong_shape", result["categories"])
    return result


# One-object prompts accept extra objects (as GenEval does), so an image full of blobs in the prompt's colour
# passes them often with any shape; their "right colour, wrong shape" baseline is reported beside the score.
WRONG_SHAPE_CATEGORIES = ("single_object", "colors")


def wrong_shape_rate(meta: Mapping, detection: Detection) -> float:
    """The share of the other four shapes with which the one-object prompt would pass on this image: the
    same colour with a wrong shape. A score no higher than its mean over the prompts does not show that
    shapes are drawn."""
    (req,) = meta["include"]
    others = [shape for shape in SHAPES if shape != req["shape"]]
    return float(np.mean([score_geneval_prompt({**meta, "include": [{**req, "shape": s}]}, detection)[0]
                          for s in others]))


def _category_means(rows: list[dict], key: str, categories: Mapping) -> dict[str, float]:
    """Mean of ``key`` over each category's rows that have it (images that were missing have none)."""
    means = {}
    for category in categories:
        values = [r[key] for r in rows if r["category"] == category and key in r]
        if values:
            means[category] = float(np.mean(values))
    return means


def score_edits(prompts, images) -> dict:
    """Score edit pairs (JSONL path or records with ``source``/``target`` scenes) against edited images."""
    rows = []
    for meta in _as_records(prompts):
        _require(meta, ("id", "category", "source", "target"), "edit")
        detection, reason = _detect_or_reason(images, meta["id"])
        satisfied = preserved = False
        if detection is not None:
            try:
                satisfied, preserved, reason = score_edit_pair(meta, detection)
            except ValueError as err:
                raise ValueError(f"edit record {meta['id']!r}: {err}") from err
        rows.append({"id": meta["id"], "category": meta["category"], "correct": bool(satisfied and preserved),
                     "instruction": bool(satisfied), "preserved": bool(preserved), "reason": reason,
                     "detected": detection.to_dict() if detection else None})
    return _summarise("edit", EDIT_CATEGORIES, rows, extra_keys=("instruction", "preserved"))


_COLUMNS = {"instruction": "instruction", "preserved": "preserved", "objects_per_image": "objects/img",
            "wrong_shape_baseline": "wrong shape"}


def format_table(result: dict) -> str:
    """The scores per category; GenEval-style results also show objects per image and, for single_object
    and colors, the "right colour, wrong shape" baseline (:func:`wrong_shape_rate`)."""
    extra = [k for k in _COLUMNS if k in result]
    header = f"{'category':<16}{'n':>5}{'score':>8}" + "".join(f"{_COLUMNS[k]:>13}" for k in extra)
    lines = [f"ShapesEval ({result['task']})", header, "-" * len(header)]
    for name, score in result["categories"].items():
        cells = [f"{result[k][name]:>13.2f}" if name in result[k] else f"{'':>13}" for k in extra]
        lines.append(f"{name:<16}{result['counts'][name]:>5}{score:>8.2f}" + "".join(cells))
    lines.append("-" * len(header))
    lines.append(f"{'overall':<16}{sum(result['counts'].values()):>5}{result['overall']:>8.2f}"
                 f"  (standard error {result['overall_standard_error']:.2f})")
    if result["missing"]:
        lines.append(f"{len(result['missing'])} image(s) missing or unreadable (scored 0), e.g. {result['missing'][0]}")
    return "\n".join(lines)
