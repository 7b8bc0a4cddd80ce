"""Batches of generations written to disk: ``OUT/<id>.png`` plus one JSONL row per item with its settings.

Shared by ``python -m lit_star generate`` / ``edit`` and by ShapesEval, so a scored image and a generated
one come from the same code path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lit_star.data.jsonl import read_jsonl
from lit_star.sampling.decoding import DecodeOptions
from lit_star.sampling.filtering import SamplerConfig
from lit_star.sampling.modes import (
    REFERENCE_MAX_ANSWER_TOKENS,
    Star,
    codes_to_images,
    generate_codes,
    reason_then_generate,
)


def read_prompt_records(path: str | Path) -> list[dict]:
    """``{"prompt": str, "id"?: str, "seed"?: int, ...}`` per line; errors name the file and line."""

    def check(record: dict) -> str | None:
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            return "needs a non-empty string 'prompt'"
        if "seed" in record and not isinstance(record["seed"], int):
            return f"'seed' must be an integer, got {record['seed']!r}"
        return None

    return read_jsonl(path, check)


def assign_ids_and_seeds(records: list[dict], base_seed: int) -> list[dict]:
    """Give every record an ``id`` (its index if absent) and a ``seed`` (``base_seed + index`` if absent)."""
    out, seen = [], set()
    for index, record in enumerate(records):
        record = {**record, "id": str(record.get("id", f"{index:05d}")), "seed": int(record.get("seed", base_seed + index))}
        if record["id"] in seen:
            raise ValueError(f"duplicate prompt id {record['id']!r}")
        if any(ch in record["id"] for ch in "/\\") or record["id"] in (".", ".."):
            raise ValueError(f"prompt id {record['id']!r} cannot be a file name")
        seen.add(record["id"])
        out.append(record)
    return out


def check_batch_size(size: int) -> None:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    check_batch_size(size)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rendered_dir(out: str | Path, name: str) -> Path:
    """Where ``write_generations(also_render={name: ...})`` puts the second rendering of ``out``'s codes."""
    out = Path(out)
    return out.with_name(f"{out.name}_{name}")


def save_images(images: Sequence[Image.Image], names: Sequence[str], out: Path) -> list[str]:
    files = []
    for image, name in zip(images, names):
        image.save(out / f"{name}.png")
        files.append(f"{name}.png")
    return files


def token_bar(star: Star, num_images: int, unit: str) -> tuple[tqdm, Callable[[int], None]]:
    bar = tqdm(total=num_images * star.num_tokens, unit="tok", desc=unit, dynamic_ncols=True)
    return bar, bar.update


def write_generations(
    star: Star,
    records: Sequence[dict],
    out: Path,
    sampler: SamplerConfig,
    options: DecodeOptions = DecodeOptions(),
    batch_size: int = 8,
    reasoning_suffix: str | None = None,
    max_answer_tokens: int = REFERENCE_MAX_ANSWER_TOKENS,
    extra_settings: dict | None = None,
    render: Callable[[object, list[str], list[int]], list[Image.Image]] | None = None,
    also_render: Mapping[str, Callable[[object, list[str], list[int]], list[Image.Image]]] | None = None,
) -> list[dict]:
    """Generate ``OUT/<id>.png`` for records carrying ``prompt``, ``id`` and ``seed`` (see
    :func:`assign_ids_and_seeds`) and log each, with the settings, to ``OUT/generations.jsonl``.

    ``reasoning_suffix`` not None switches on implicit reasoning (the base answers first). Returns the
    logged rows (also what ``eval shapes --ckpt`` can score from). ``render(codes, prompts, seeds)`` turns
    the codes into images (default: the stage 2 VQ's decoder; :func:`lit_star.sampling.diffusion.diffusion_renderer`
    for the stage 3 decoder). ``also_render`` maps a name to a second renderer of the same codes, whose images go
    to ``OUT_<name>/<id>.png``: two decoders compared on the very samples the stack drew.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    also_render = dict(also_render or {})
    for name in also_render:
        rendered_dir(out, name).mkdir(parents=True, exist_ok=True)
    reasoning = reasoning_suffix is not None
    settings = {**sampler.as_dict(), **(extra_settings or {}), "image_size": star.image_size, "reasoning": reasoning}
    if reasoning:
        settings["reasoning_suffix"] = reasoning_suffix
    rows = []
    bar, progress = token_bar(star, len(records), "generate")
    with open(out / "generations.jsonl", "w", encoding="utf-8") as log:
        for batch in batches(records, batch_size):
            prompts, seeds = [r["prompt"] for r in batch], [r["seed"] for r in batch]
            extra: list[dict] = [{} for _ in batch]
            if reasoning:
                reasoned = reason_then_generate(
                    star, prompts, sampler, seeds, options, reasoning_suffix, max_answer_tokens, progress
                )
                codes = reasoned.codes
                extra = [{"answer": a, "generation_prompt": g} for a, g in zip(reasoned.answers, reasoned.generation_prompts)]
            else:
                codes = generate_codes(star, prompts, sampler, seeds, options, progress)
            images = codes_to_images(star.vq, codes) if render is None else render(codes, prompts, seeds)
            files = save_images(images, [r["id"] for r in batch], out)
            for name, other in also_render.items():
                save_images(other(codes, prompts, seeds), [r["id"] for r in batch], rendered_dir(out, name))
            for record, file, more in zip(batch, files, extra):
                rows.append({**record, **more, "image": file, "settings": settings})
                log.write(json.dumps(rows[-1]) + "\n")
            log.flush()
    bar.close()
    return rows
