"""Sample a stage 2 checkpoint: text-to-image, editing and understanding.

    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "a red circle above a blue square" --out samples
    python -m lit_star generate --ckpt runs/star3b --prompts prompts.jsonl --out samples --cfg 3 --topk 1000 --topp 0.8 \\
        --seed 0 --batch-size 8
    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "the colour of a lemon, the shape of the sun" \\
        --reasoning --out samples
    python -m lit_star edit --ckpt runs/stage2/last.ckpt --image in.png --instruction "make the circle green" --out edits
    python -m lit_star understand --ckpt runs/stage2/last.ckpt --image in.png --question "How many circles are there?"

``--ckpt`` is a stage 2 checkpoint: our Lightning ``.ckpt`` or a ``save_stacked_ar`` / ``import-reference``
directory (see :mod:`lit_star.sampling.loading`). ``--prompts`` is JSONL, one ``{"prompt": ..., "id": ...,
"seed": ...}`` per line (``id`` and ``seed`` optional). Images go to ``OUT/<id>.png`` and every generated
item, with the settings used, to ``OUT/generations.jsonl`` (``edits.jsonl``, ``answers.jsonl``).
Sample i is drawn with seed ``--seed + i`` unless its record gives one, so a seed reproduces its image at
any ``--batch-size``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lit_star.data.jsonl import read_jsonl
from lit_star.sampling.decoding import DecodeOptions
from lit_star.sampling.filtering import REFERENCE_CFG_SCALE, REFERENCE_TOP_K, REFERENCE_TOP_P, SamplerConfig
from lit_star.sampling.loading import load_star
from lit_star.sampling.modes import (
    REFERENCE_REASONING_SUFFIX,
    Star,
    answer_questions,
    codes_to_images,
    edit_codes,
    generate_codes,
    reason_then_generate,
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", required=True, help="stage 2 checkpoint: Lightning .ckpt or save_stacked_ar/import-reference dir")
    group.add_argument("--base", help="Qwen2.5-VL directory overriding the recorded one")
    group.add_argument("--vq", help="VQ checkpoint overriding the recorded/bundled one")
    group.add_argument("--vq-flavour", help="VQ flavour of a reference-layout VQ-Model.pt given with --vq")
    group.add_argument("--image-size", type=int, help="generated image side (default: recorded in the checkpoint)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--stack-dtype", choices=("float32", "bfloat16", "float16"),
                       help="dtype of stack, adapter and head at inference (default: as stored, float32)")
    group.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg", type=float, default=REFERENCE_CFG_SCALE, help="guidance weight (1: no unconditional rows)")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--topk", type=int, default=REFERENCE_TOP_K, help="0 disables top-k")
    group.add_argument("--topp", type=float, default=REFERENCE_TOP_P, help="1 disables top-p")
    group.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    group.add_argument("--seed", type=int, default=0, help="sample i uses seed + i unless its record sets one")
    group.add_argument("--batch-size", type=int, default=8, help="samples decoded together (x2 rows with guidance)")
    group.add_argument("--static-cache", action="store_true", help="preallocated KV caches, fixed-shape steps")
    group.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU; implies --static-cache)")
    group.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")


def sampler_from_args(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.topk, top_p=args.topp, greedy=args.greedy)


def decode_options_from_args(args: argparse.Namespace) -> DecodeOptions:
    return DecodeOptions(static_cache=args.static_cache, compile=args.compile, compile_mode=args.compile_mode)


def load_from_args(args: argparse.Namespace) -> Star:
    torch.set_num_threads(args.threads)
    return load_star(
        args.ckpt, base=args.base, vq=args.vq, vq_flavour=args.vq_flavour, image_size=args.image_size,
        device=args.device, stack_dtype=getattr(torch, args.stack_dtype) if args.stack_dtype else None,
    )


def _load_for_drawing(args: argparse.Namespace, command: str) -> Star | None:
    """The checkpoint, or None after telling the user it lacks the image size that drawing needs."""
    star = load_from_args(args)
    if star.image_size is None:
        print(f"{command}: {args.ckpt} does not record its image size; pass --image-size", file=sys.stderr)
        return None
    return star


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


def _check_batch_size(size: int) -> None:
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    _check_batch_size(size)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _save(images: Sequence[Image.Image], names: Sequence[str], out: Path) -> list[str]:
    files = []
    for image, name in zip(images, names):
        image.save(out / f"{name}.png")
        files.append(f"{name}.png")
    return files


def _token_bar(star: Star, num_images: int, unit: str) -> tuple[tqdm, Callable[[int], None]]:
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
    max_answer_tokens: int = 64,
    extra_settings: dict | None = None,
) -> list[dict]:
    """Generate ``OUT/<id>.png`` for records carrying ``prompt``, ``id`` and ``seed`` (see
    :func:`assign_ids_and_seeds`) and log each, with the settings, to ``OUT/generations.jsonl``.

    ``reasoning_suffix`` not None switches on implicit reasoning (the base answers first). Returns the
    logged rows (also what ``eval shapes --ckpt`` can score from).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reasoning = reasoning_suffix is not None
    settings = {**sampler.as_dict(), **(extra_settings or {}), "image_size": star.image_size, "reasoning": reasoning}
    if reasoning:
        settings["reasoning_suffix"] = reasoning_suffix
    rows = []
    bar, progress = _token_bar(star, len(records), "generate")
    with open(out / "generations.jsonl", "w", encoding="utf-8") as log:
        for batch in _batches(records, batch_size):
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
            files = _save(codes_to_images(star.vq, codes), [r["id"] for r in batch], out)
            for record, file, more in zip(batch, files, extra):
                rows.append({**record, **more, "image": file, "settings": settings})
                log.write(json.dumps(rows[-1]) + "\n")
            log.flush()
    bar.close()
    return rows


def main(argv: list[str]) -> int:
    """``python -m lit_star generate``: text-to-image (optionally with implicit reasoning)."""
    parser = argparse.ArgumentParser(prog="python -m lit_star generate", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_sampler_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="JSONL file of {'prompt', 'id'?, 'seed'?} records")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--reasoning", action="store_true", help="the base answers the prompt first; its answer is drawn")
    parser.add_argument("--reasoning-suffix", default=REFERENCE_REASONING_SUFFIX,
                        help="appended to the base's answer (the reference's quality phrase by default)")
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    try:
        records = [{"prompt": p} for p in args.prompt] + (read_prompt_records(args.prompts) if args.prompts else [])
        if not records:
            raise ValueError("give --prompt and/or --prompts")
        records = assign_ids_and_seeds(records, args.seed)
        sampler = sampler_from_args(args)
        _check_batch_size(args.batch_size)
    except (OSError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    star = _load_for_drawing(args, "generate")
    if star is None:
        return 2
    write_generations(
        star, records, args.out, sampler, decode_options_from_args(args), args.batch_size,
        reasoning_suffix=args.reasoning_suffix if args.reasoning else None,
        max_answer_tokens=args.max_answer_tokens, extra_settings={"ckpt": str(args.ckpt)},
    )
    print(f"wrote {len(records)} image(s) and generations.jsonl to {args.out}")
    return 0


def _open_image(path: str) -> Image.Image:
    from lit_star.data.images import decode_image

    return decode_image(Path(path).read_bytes())


def edit_main(argv: list[str]) -> int:
    """``python -m lit_star edit``: edit one image with an instruction."""
    parser = argparse.ArgumentParser(prog="python -m lit_star edit", description="Edit an image with an instruction.")
    add_model_args(parser)
    add_sampler_args(parser)
    parser.add_argument("--image", required=True, help="source image")
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--num-images", type=int, default=1, help="edits to draw (seeds --seed, --seed + 1, ...)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    try:
        source = _open_image(args.image)
        sampler = sampler_from_args(args)
        _check_batch_size(args.batch_size)
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    except (OSError, ValueError) as err:
        print(f"edit: {err}", file=sys.stderr)
        return 2
    star = _load_for_drawing(args, "edit")
    if star is None:
        return 2
    options = decode_options_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {**sampler.as_dict(), "ckpt": str(args.ckpt), "image_size": star.image_size}
    seeds = [args.seed + i for i in range(args.num_images)]
    bar, progress = _token_bar(star, len(seeds), "edit")
    with open(args.out / "edits.jsonl", "w", encoding="utf-8") as log:
        for batch in _batches(seeds, args.batch_size):
            codes = edit_codes(star, [source] * len(batch), [args.instruction] * len(batch), sampler, batch, options, progress)
            files = _save(codes_to_images(star.vq, codes), [f"edit_{seed}" for seed in batch], args.out)
            for seed, file in zip(batch, files):
                record = {"source": args.image, "instruction": args.instruction, "seed": seed, "image": file}
                log.write(json.dumps({**record, "settings": settings}) + "\n")
    bar.close()
    print(f"wrote {len(seeds)} edit(s) and edits.jsonl to {args.out}")
    return 0


def understand_main(argv: list[str]) -> int:
    """``python -m lit_star understand``: the frozen base answers a question about an image."""
    parser = argparse.ArgumentParser(prog="python -m lit_star understand", description="Answer a question about an image.")
    add_model_args(parser)
    parser.add_argument("--image", help="image the question is about (omit for a text-only question)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also append the answer to OUT/answers.jsonl")
    args = parser.parse_args(argv)
    try:
        images = None if args.image is None else [_open_image(args.image)]
    except (OSError, ValueError) as err:
        print(f"understand: {err}", file=sys.stderr)
        return 2
    star = load_from_args(args)
    with tqdm(total=1, unit="answer", desc="understand") as bar:
        answer = answer_questions(star, [args.question], images, max_new_tokens=args.max_new_tokens)[0]
        bar.update(1)
    print(answer)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"image": args.image, "question": args.question, "answer": answer,
                  "settings": {"ckpt": str(args.ckpt), "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}}
        with open(args.out / "answers.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
    return 0
