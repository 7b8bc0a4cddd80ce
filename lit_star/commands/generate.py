"""Sample a stage 2 checkpoint: text-to-image, editing and understanding.

    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "a red circle above a blue square" --out samples
    python -m lit_star generate --ckpt runs/star3b --prompts prompts.jsonl --out samples --cfg 3 --topk 1000 --topp 0.8 \\
        --seed 0 --batch-size 8
    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "the colour of a lemon, the shape of the sun" \\
        --reasoning --out samples
    python -m lit_star edit --ckpt runs/stage2/last.ckpt --image in.png --instruction "make the circle green" --out edits
    python -m lit_star understand --ckpt runs/stage2/last.ckpt --image in.png --question "How many circles are there?"
    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "a red circle" --out samples \
        --decoder diffusion --decoder-ckpt runs/stage3/last.ckpt --decoder-size 128      # stage 3 decodes the codes

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
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lit_star.commands.options import (
    add_model_args,
    add_sampler_args,
    decode_options_from_args,
    load_from_args,
    sampler_from_args,
)
from lit_star.sampling.generations import (
    assign_ids_and_seeds,
    batches,
    check_batch_size,
    read_prompt_records,
    save_images,
    token_bar,
    write_generations,
)
from lit_star.sampling.modes import (
    REFERENCE_REASONING_SUFFIX,
    Star,
    answer_questions,
    codes_to_images,
    edit_codes,
)


def add_decoder_args(parser: argparse.ArgumentParser, steps: int, guidance: float, image_guidance: float) -> None:
    group = parser.add_argument_group("pixel decoder")
    group.add_argument("--decoder", choices=["vq", "diffusion"], default="vq",
                       help="decode the codes with the VQ decoder or the stage 3 diffusion decoder")
    group.add_argument("--decoder-ckpt", help="stage 3 checkpoint (DiffusionDecoderModule .ckpt or save_decoder dir)")
    group.add_argument("--decoder-size", type=int, help="diffusion output side (default: the stage 2 image size)")
    group.add_argument("--decoder-steps", type=int, default=steps)
    group.add_argument("--decoder-guidance", type=float, default=guidance)
    group.add_argument("--decoder-image-guidance", type=float, default=image_guidance)


def _stage3_from_args(args: argparse.Namespace, star: Star):
    """(decoder, scheduler, settings, size) for --decoder diffusion, or None for the VQ decoder."""
    if args.decoder == "vq":
        return None
    if not args.decoder_ckpt:
        raise ValueError("--decoder diffusion needs --decoder-ckpt")
    from lit_star.checkpoints import load_stage3
    from lit_star.sampling.diffusion import GuidanceSettings

    stage3 = load_stage3(args.decoder_ckpt, vq=args.vq, vq_flavour=args.vq_flavour)
    stage3.decoder.to(args.device)
    settings = GuidanceSettings(args.decoder_steps, args.decoder_guidance, args.decoder_image_guidance)
    return stage3.decoder, stage3.scheduler, settings, args.decoder_size or star.image_size


def _load_for_drawing(args: argparse.Namespace, command: str) -> Star | None:
    """The checkpoint, or None after telling the user it lacks the image size that drawing needs."""
    star = load_from_args(args)
    if star.image_size is None:
        print(f"{command}: {args.ckpt} does not record its image size; pass --image-size", file=sys.stderr)
        return None
    return star


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
    add_decoder_args(parser, 40, 4.5, 1.05)
    args = parser.parse_args(argv)

    try:
        records = [{"prompt": p} for p in args.prompt] + (read_prompt_records(args.prompts) if args.prompts else [])
        if not records:
            raise ValueError("give --prompt and/or --prompts")
        records = assign_ids_and_seeds(records, args.seed)
        sampler = sampler_from_args(args)
        check_batch_size(args.batch_size)
    except (OSError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    star = _load_for_drawing(args, "generate")
    if star is None:
        return 2
    render, extra = None, {"ckpt": str(args.ckpt), "decoder": args.decoder}
    try:
        stage3 = _stage3_from_args(args, star)
        if stage3 is not None:
            from lit_star.sampling.diffusion import diffusion_renderer

            decoder, scheduler, settings, size = stage3
            render = diffusion_renderer(decoder, scheduler, star.vq, size, settings)
            extra.update(decoder_ckpt=str(args.decoder_ckpt), decoder_size=size, decoder_settings=settings.as_dict())
    except (OSError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    write_generations(
        star, records, args.out, sampler, decode_options_from_args(args), args.batch_size,
        reasoning_suffix=args.reasoning_suffix if args.reasoning else None,
        max_answer_tokens=args.max_answer_tokens, extra_settings=extra, render=render,
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
    add_decoder_args(parser, 50, 3.0, 1.8)
    args = parser.parse_args(argv)
    try:
        source = _open_image(args.image)
        sampler = sampler_from_args(args)
        check_batch_size(args.batch_size)
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    except (OSError, ValueError) as err:
        print(f"edit: {err}", file=sys.stderr)
        return 2
    star = _load_for_drawing(args, "edit")
    if star is None:
        return 2
    options = decode_options_from_args(args)
    try:
        stage3 = _stage3_from_args(args, star)
    except (OSError, ValueError) as err:
        print(f"edit: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {**sampler.as_dict(), "ckpt": str(args.ckpt), "image_size": star.image_size, "decoder": args.decoder}
    if stage3 is not None:
        settings.update(decoder_ckpt=str(args.decoder_ckpt), decoder_size=stage3[3], decoder_settings=stage3[2].as_dict())
    seeds = [args.seed + i for i in range(args.num_images)]
    bar, progress = token_bar(star, len(seeds), "edit")
    with open(args.out / "edits.jsonl", "w", encoding="utf-8") as log:
        for batch in batches(seeds, args.batch_size):
            codes = edit_codes(star, [source] * len(batch), [args.instruction] * len(batch), sampler, batch, options, progress)
            if stage3 is None:
                images = codes_to_images(star.vq, codes)
            else:
                images = _diffusion_edit(stage3, star, source, args.instruction, batch, codes)
            files = save_images(images, [f"edit_{seed}" for seed in batch], args.out)
            for seed, file in zip(batch, files):
                record = {"source": args.image, "instruction": args.instruction, "seed": seed, "image": file}
                log.write(json.dumps({**record, "settings": settings}) + "\n")
    bar.close()
    print(f"wrote {len(seeds)} edit(s) and edits.jsonl to {args.out}")
    return 0


def _diffusion_edit(stage3, star: Star, source, instruction: str, seeds, codes):
    """The stage 3 decoder's edit: the source encoded at the output size, the stack's codes as the VQ pass."""
    import numpy as np
    import torch

    from lit_star.sampling.diffusion import edit_with_diffusion, to_pil

    decoder, scheduler, settings, size = stage3
    pixels = np.asarray(source.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1
    images = edit_with_diffusion(decoder, scheduler, tensor[None].expand(len(seeds), -1, -1, -1),
                                 [instruction] * len(seeds), list(seeds), vq=star.vq, codes=codes, settings=settings)
    return to_pil(images)


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
