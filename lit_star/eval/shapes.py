"""ShapesEval: score a folder of images, or generate the world's eval sets with a stage 2 checkpoint and score them.

    python -m lit_star eval shapes --prompts runs/shapes_world/eval/geneval.jsonl --images runs/shapes_world/eval/geneval_gt
    python -m lit_star eval shapes --prompts runs/shapes_world/eval/edit.jsonl --images runs/shapes_world/eval/edit_gt --out edit.json
    python -m lit_star eval shapes --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \\
        --world runs/shapes_world --out runs/shapes/eval --config recipes/shapes/sampler.yaml

Writes under ``--out``: one folder of images per set (``geneval/`` the held-out set and ``geneval_seen/`` the
seen-pair set, ShapesEval's two headline scores; ``geneval_seen_dev/`` with ``--development true``, the set
on which to choose sampler settings; ``knowledge_plain/``, ``knowledge_reasoning/``; ``edit/`` with
``--edits true``; with ``--seen_combinations N`` ``geneval_seen_combinations/``: N prompts per category
built in code from seen pairs; with ``--seen_riddles N`` ``knowledge_seen_plain/`` and
``knowledge_seen_reasoning/``: N riddles per category whose answers name seen pairs), each with its
``generations.jsonl``; an image grid per set and category (``grids/<set>_<category>.png``); and
``results.json`` with the scores, ``headline`` (seen and held-out with standard errors), the sampler
settings, the reasoning suffix and the base's riddle answers.

The knowledge riddles are scored twice with the same seeds: drawn from the riddle text directly,
and with implicit reasoning (the frozen base answers the riddle first and the stack draws its answer plus
the checkpoint's reasoning suffix, empty for Shapes stacks). Their answers name held-out pairs, so a stack
that does not compose scores near zero either way; the seen-pair riddles show what reasoning buys when the
drawing itself is within the stack's reach.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lit_star.sampling.decoding import DecodeOptions
from lit_star.sampling.filtering import SamplerConfig
from lit_star.sampling.generations import assign_ids_and_seeds, rendered_dir, write_generations
from lit_star.sampling.modes import (
    REFERENCE_REASONING_SUFFIX,
    Star,
    codes_to_images,
    edit_codes,
)
from lit_star.worlds.shapes.generator import (
    seen_combination_prompts,
    seen_combination_riddles,
)
from lit_star.worlds.shapes.scorer import (
    format_table,
    load_prompts,
    score_edits,
    score_geneval,
)

GRID_COLUMNS = 8
GRID_MAX_IMAGES = 32


def tile_images(images: Sequence[Image.Image], columns: int = GRID_COLUMNS) -> Image.Image:
    """Paste equally sized images row by row onto one canvas (a 2 px white gutter between them)."""
    if not images:
        raise ValueError("tile_images got no images")
    width, height = images[0].size
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    gutter = 2
    canvas = Image.new("RGB", (columns * (width + gutter) - gutter, rows * (height + gutter) - gutter), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas.paste(image.convert("RGB"), (column * (width + gutter), row * (height + gutter)))
    return canvas


def grid_prompts_path(grid: str | Path) -> Path:
    """The text file beside a grid that lists its tiles' prompts, one per line, row by row."""
    return Path(grid).with_suffix(".prompts.txt")


def write_category_grids(records: Sequence[dict], image_dir: Path, grid_dir: Path, set_name: str) -> list[str]:
    """One grid per category (the first GRID_MAX_IMAGES images, GRID_COLUMNS per row) and, beside it, the
    prompt (or edit instruction) of every tile; returns the grids' paths."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_category[record.get("category", "all")].append(record)
    grid_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for category, members in sorted(by_category.items()):
        images = [Image.open(image_dir / f"{r['id']}.png") for r in members[:GRID_MAX_IMAGES]]
        path = grid_dir / f"{set_name}_{category}.png"
        tile_images(images).save(path)
        prompts = [r.get("prompt") or r.get("instruction") or r["id"] for r in members[:GRID_MAX_IMAGES]]
        grid_prompts_path(path).write_text("\n".join(prompts) + "\n", encoding="utf-8")
        written.append(str(path))
    return written


def limit_per_category(records: list[dict], limit: int | None) -> list[dict]:
    if limit is None:
        return records
    taken: dict[str, int] = defaultdict(int)
    kept = []
    for record in records:
        category = record.get("category", "all")
        if taken[category] < limit:
            taken[category] += 1
            kept.append(record)
    return kept


def _generate_and_score(star, records, out, sampler, options, batch_size, seed, reasoning_suffix: str | None,
                        also_render=None):
    """Draw ``records`` (with implicit reasoning when ``reasoning_suffix`` is not None) and score them; with
    ``also_render`` (name -> renderer) the same codes are also decoded by each renderer into ``OUT_<name>``,
    scored too: returns (rows, scores, {name: scores})."""
    records = assign_ids_and_seeds(records, seed)
    rows = write_generations(star, records, out, sampler, options, batch_size, reasoning_suffix=reasoning_suffix,
                             also_render=also_render)
    others = {name: score_geneval(records, rendered_dir(out, name)) for name in also_render or {}}
    return rows, score_geneval(records, out), others


# The world's GenEval-style sets: results key, file stem under eval/, what the printed table calls it.
GENEVAL_SETS = {
    "geneval": ("geneval", "GenEval-style, held-out colour/shape pairs"),
    "geneval_seen": ("geneval_seen", "GenEval-style, seen colour/shape pairs"),
    "geneval_seen_dev": ("geneval_seen_dev", "GenEval-style, seen-pair development set (for choosing the sampler)"),
}


def headline(results: dict) -> dict:
    """ShapesEval's two headline scores, side by side: ``seen`` (training pairs) and ``held_out`` (the
    eval set), each the mean of the six category scores with its binomial standard error."""
    return {name: {"overall": results[key]["overall"], "standard_error": results[key]["overall_standard_error"]}
            for name, key in (("seen", "geneval_seen"), ("held_out", "geneval")) if key in results}


def format_headline(scores: dict) -> str:
    return "ShapesEval: " + ", ".join(f"{name.replace('_', '-')} {s['overall']:.3f} ± {s['standard_error']:.3f}"
                                      for name, s in scores.items())


def reasoning_suffix_of(star: Star) -> str:
    """The phrase appended to the base's answer in reasoning mode: the one the checkpoint records (what its
    training captions end with), else the reference's."""
    recorded = getattr(star, "reasoning_suffix", None)
    return REFERENCE_REASONING_SUFFIX if recorded is None else recorded


def _edit_and_score(star: Star, records, source_dir: Path, out: Path, sampler, options, batch_size, seed):
    records = assign_ids_and_seeds([{**r, "prompt": r["instruction"]} for r in records], seed)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(records), unit="edit", desc="edit", dynamic_ncols=True)
    with open(out / "edits.jsonl", "w", encoding="utf-8") as log:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            sources = []
            for record in batch:
                path = source_dir / f"{record['id']}.png"
                if not path.is_file():
                    raise FileNotFoundError(f"edit source image {path} (for {record['id']}) is missing")
                sources.append(Image.open(path).convert("RGB"))
            codes = edit_codes(star, sources, [r["instruction"] for r in batch], sampler, [r["seed"] for r in batch], options)
            for record, image in zip(batch, codes_to_images(star.vq, codes)):
                image.save(out / f"{record['id']}.png")
                log.write(json.dumps({"id": record["id"], "instruction": record["instruction"], "seed": record["seed"],
                                      "settings": sampler.as_dict()}) + "\n")
            bar.update(len(batch))
    bar.close()
    return score_edits(records, out)


def evaluate_on_shapes(
    star: Star,
    world: str | Path,
    out: str | Path,
    sampler: SamplerConfig,
    options: DecodeOptions = DecodeOptions(),
    batch_size: int = 16,
    seed: int = 0,
    edits: bool = False,
    knowledge: bool = True,
    per_category: int | None = None,
    seen_combinations: int = 0,
    seen_riddles: int = 0,
    geneval: bool = True,
    seen: bool = True,
    development: bool = False,
    reasoning_suffix: str | None = None,
    also_render: dict | None = None,
    log=print,
) -> dict:
    """Generate and score the world's eval sets; returns (and writes) ``results.json``'s content.

    ``seen_combinations`` > 0 adds that many control prompts per category whose colour/shape pairs
    occur in training (:func:`lit_star.worlds.shapes.generator.seen_combination_prompts`); ``seen_riddles`` > 0
    that many riddles per category answered by seen pairs
    (:func:`lit_star.worlds.shapes.generator.seen_combination_riddles`), with and without reasoning.
    ``geneval`` scores the held-out set (``eval/geneval.jsonl``), ``seen`` the seen-pair set
    (``eval/geneval_seen.jsonl``): ShapesEval's two headline scores, written side by side as ``headline``.
    ``development`` scores the seen-pair development set (``eval/geneval_seen_dev.jsonl``), the only set
    on which sampler settings may be chosen. Turning sets off lets two processes share them (decoding one
    code at a time, a CPU process gains nothing from a second thread; a second process does).
    ``reasoning_suffix`` is appended to the base's answer in reasoning mode; None takes the checkpoint's
    (:func:`reasoning_suffix_of`). ``also_render`` (name -> ``render(codes, prompts, seeds)``) decodes the
    GenEval-style sets' codes a second way too, e.g. ``{"diffusion": ...}`` for a stage 3/4 decoder: each set's
    ``<set>_<name>/`` images and ``results[<set>_<name>]`` scores sit beside the VQ decoder's, on the same samples.
    """
    if not (geneval or seen or development or seen_combinations or knowledge or seen_riddles or edits):
        raise ValueError("evaluate_on_shapes: no set selected (geneval, seen, development, seen_combinations, "
                         "knowledge, seen_riddles and edits all off)")
    eval_dir, out = Path(world) / "eval", Path(out)
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"{eval_dir} does not exist: generate the world first (python -m lit_star data shapes)")
    chosen = [key for key, on in (("geneval", geneval), ("geneval_seen", seen), ("geneval_seen_dev", development)) if on]
    for key in chosen:
        if not (eval_dir / f"{GENEVAL_SETS[key][0]}.jsonl").is_file():
            raise FileNotFoundError(f"{eval_dir / GENEVAL_SETS[key][0]}.jsonl does not exist: the world predates "
                                    "the seen-pair sets; regenerate it, or turn the set off")
    suffix = reasoning_suffix_of(star) if reasoning_suffix is None else reasoning_suffix
    results: dict = {"sampler": sampler.as_dict(), "seed": seed, "per_category": per_category,
                     "reasoning_suffix": suffix}
    grids: list[str] = []

    def geneval_set(key: str, records: list[dict], folder: str, title: str) -> None:
        _, results[key], others = _generate_and_score(star, records, out / folder, sampler, options, batch_size, seed,
                                                      None, also_render)
        grids.extend(write_category_grids(records, out / folder, out / "grids", folder))
        log(f"{title}:\n" + format_table(results[key]))
        for name, scores in others.items():
            results[f"{key}_{name}"] = scores
            rendered = rendered_dir(out / folder, name)
            grids.extend(write_category_grids(records, rendered, out / "grids", rendered.name))
            log(f"{title}, decoded by the {name} decoder:\n" + format_table(scores))

    for key in chosen:
        stem, title = GENEVAL_SETS[key]
        geneval_set(key, limit_per_category(load_prompts(eval_dir / f"{stem}.jsonl"), per_category), stem, title)

    if seen_combinations:
        geneval_set("geneval_seen_combinations", seen_combination_prompts(seen_combinations, resolution=star.image_size),
                    "geneval_seen_combinations", "GenEval-style, seen colour/shape pairs built in code (control)")

    def riddles(records: list[dict], name: str, answers_prefix: str, title: str) -> None:
        """Draw ``records`` from the riddle text and, with implicit reasoning, from the base's answer."""
        _, results[f"{name}_without_reasoning"], _ = _generate_and_score(
            star, records, out / f"{name}_plain", sampler, options, batch_size, seed, None)
        rows, results[f"{name}_with_reasoning"], _ = _generate_and_score(
            star, records, out / f"{name}_reasoning", sampler, options, batch_size, seed, suffix)
        answers = {row["id"]: row["answer"] for row in rows}
        correct = [answers[r["id"]].strip() == r["caption"] for r in records]
        results[f"{answers_prefix}_answer_accuracy"] = sum(correct) / len(correct)
        results[f"{answers_prefix}_answers"] = answers
        for mode in ("plain", "reasoning"):
            grids.extend(write_category_grids(records, out / f"{name}_{mode}", out / "grids", f"{name}_{mode}"))
        log(f"{title} without reasoning:\n" + format_table(results[f"{name}_without_reasoning"]))
        log(f"{title} with reasoning:\n" + format_table(results[f"{name}_with_reasoning"]))

    if knowledge:
        riddles(limit_per_category(load_prompts(eval_dir / "knowledge.jsonl"), per_category), "knowledge", "riddle",
                "Knowledge riddles")

    if seen_riddles:
        riddles(seen_combination_riddles(seen_riddles, resolution=star.image_size), "knowledge_seen",
                "seen_riddle", "Knowledge riddles on seen colour/shape pairs (control)")

    if edits:
        records = limit_per_category(load_prompts(eval_dir / "edit.jsonl"), per_category)
        results["edit"] = _edit_and_score(star, records, eval_dir / "edit_source", out / "edit", sampler, options,
                                          batch_size, seed)
        grids += write_category_grids(records, out / "edit", out / "grids", "edit")
        log("Edits:\n" + format_table(results["edit"]))

    results["grids"] = grids
    if headline(results):
        results["headline"] = headline(results)
        log(format_headline(results["headline"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out / 'results.json'}")
    return results
