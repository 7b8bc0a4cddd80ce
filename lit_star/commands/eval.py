"""Evaluation jobs.

    python -m lit_star eval shapes --prompts P.jsonl --images DIR
    python -m lit_star eval understanding --base runs/shapes/stage0_base/hf --world runs/shapes_world
    python -m lit_star eval binding --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \
        --shards 'runs/shapes_world/t2i_codes/val-*.tar'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lit_star.commands._dispatch import dispatch

# Each job imports its heavy modules itself, so `eval --help` stays fast.

EVALS = {
    "shapes": ("ShapesEval: GenEval-style and edit scoring by colour segmentation (--ckpt: generate first).", "lit_star.commands.eval:shapes_main"),
    "understanding": ("VQA and riddle accuracy of a base VLM or of the frozen base in a stage 2 checkpoint.", "lit_star.commands.eval:understanding_main"),
    "binding": ("Whether a stage 2 model prefers an image's own colour/shape caption (likelihood classification).", "lit_star.commands.eval:binding_main"),
    "decoders": ("Table 7a in small: VQ decoder vs stage 3 diffusion decoders on ShapesEval's ground-truth codes.", "lit_star.commands.eval:decoders_main"),
}


def decoders_main(argv: list[str]) -> int:
    import argparse
    from pathlib import Path

    from lit_star.eval.decoders import __doc__ as doc
    from lit_star.eval.decoders import compare_decoders, format_comparison
    from lit_star.sampling.diffusion import GuidanceSettings

    parser = argparse.ArgumentParser(prog="python -m lit_star eval decoders", description=doc.split("\n\n")[0])
    parser.add_argument("--world", required=True, type=Path)
    parser.add_argument("--vq", required=True)
    parser.add_argument("--stage3", action="append", default=[], help="stage 3 checkpoint (repeatable)")
    parser.add_argument("--size", type=int, help="output side (default: the GT size; larger: super-resolution)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--image-guidance", type=float, default=1.05)
    parser.add_argument("--features", help="torch.export feature network for the Fréchet distance")
    parser.add_argument("--limit", type=int, help="prompts per category (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = compare_decoders(args.world, args.vq, args.stage3, args.out, args.size,
                               GuidanceSettings(args.steps, args.guidance, args.image_guidance), args.features,
                               args.limit)
    print(format_comparison(results))
    print(f"wrote {args.out / 'results.json'}")
    return 0


def main(argv: list[str]) -> int:
    return dispatch("eval", EVALS, argv)


def shapes_main(argv: list[str]) -> int:
    """Score a folder of images, or with ``--ckpt`` generate the eval sets first."""
    return generate_main(argv) if "--ckpt" in argv else score_main(argv)


def score_main(argv: list[str]) -> int:
    """``python -m lit_star eval shapes --prompts P.jsonl --images DIR``: score a folder of images."""
    from lit_star.worlds.shapes import scorer

    parser = argparse.ArgumentParser(prog="python -m lit_star eval shapes", description=score_main.__doc__)
    parser.add_argument("--prompts", required=True, help="eval JSONL: geneval.jsonl, knowledge.jsonl or edit.jsonl")
    parser.add_argument("--images", required=True, help="folder of images named <id>.png")
    parser.add_argument("--task", choices=("auto", "geneval", "edit"), default="auto",
                        help="auto: edit when the records carry source/target scenes")
    parser.add_argument("--out", help="write the scores (with per-prompt reasons) as JSON here")
    args = parser.parse_args(argv)

    if not Path(args.images).is_dir():
        print(f"eval shapes: --images {args.images} is not a folder", file=sys.stderr)
        return 2
    try:
        records = scorer.load_prompts(args.prompts)
    except (OSError, ValueError) as err:
        print(f"eval shapes: {err}", file=sys.stderr)
        return 2
    task = args.task
    if task == "auto":
        task = "edit" if "target" in records[0] else "geneval"
    try:
        result = scorer.score_edits(records, args.images) if task == "edit" else scorer.score_geneval(records, args.images)
    except ValueError as err:
        print(f"eval shapes: {args.prompts}: {err}", file=sys.stderr)
        return 2
    print(scorer.format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    if len(result["missing"]) == len(records):
        print(f"eval shapes: no image of {args.prompts} was found in {args.images}", file=sys.stderr)
        return 1
    return 0


def generate_main(argv: list[str]) -> int:
    """``python -m lit_star eval shapes --ckpt ...``: generate the eval sets, then score them."""
    from lit_star.commands.options import (
        add_model_args,
        add_sampler_args,
        decode_options_from_args,
        load_from_args,
        sampler_from_args,
    )
    from lit_star.eval import shapes

    parser = argparse.ArgumentParser(prog="python -m lit_star eval shapes --ckpt", description=shapes.__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_sampler_args(parser)
    parser.add_argument("--world", required=True, help="Shapes world directory (its eval/ folder is used)")
    parser.add_argument("--out", required=True, help="output folder for images, grids and results.json")
    parser.add_argument("--edits", action="store_true", help="also run the edit set (needs an edit-trained stack)")
    parser.add_argument("--no-knowledge", action="store_true", help="skip the riddle sets (with/without reasoning)")
    parser.add_argument("--no-geneval", action="store_true",
                        help="skip the GenEval-style set (run it in another process with --no-knowledge)")
    parser.add_argument("--per-category", type=int, help="only the first N prompts of each category (smoke runs)")
    parser.add_argument("--seen-combinations", type=int, default=0, metavar="N",
                        help="also score N control prompts per category built from colour/shape pairs seen in training")
    parser.add_argument("--seen-riddles", type=int, default=0, metavar="N",
                        help="also score N riddles per category whose answers name seen pairs, with and without reasoning")
    args = parser.parse_args(argv)
    star = load_from_args(args)
    shapes.evaluate_on_shapes(
        star, args.world, args.out, sampler_from_args(args), decode_options_from_args(args), args.batch_size, args.seed,
        edits=args.edits, knowledge=not args.no_knowledge, per_category=args.per_category,
        seen_combinations=args.seen_combinations, seen_riddles=args.seen_riddles, geneval=not args.no_geneval,
    )
    return 0


def understanding_main(argv: list[str]) -> int:
    """``python -m lit_star eval understanding``: VQA and riddle accuracy of a base or a stage 2 checkpoint."""
    import torch

    from lit_star.eval import understanding
    from lit_star.models.base_vlm import load_base_vlm, load_processor
    from lit_star.sampling.loading import load_star

    parser = argparse.ArgumentParser(prog="python -m lit_star eval understanding", description=understanding.__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="Hugging Face Qwen2.5-VL directory (e.g. the stage 0 export)")
    source.add_argument("--ckpt", help="stage 2 checkpoint: its frozen base is evaluated")
    parser.add_argument("--world", required=True, help="Shapes world directory")
    parser.add_argument("--out", help="write the scores and every answer as JSON here")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--limit", type=int, help="at most this many VQA questions and riddles (smoke runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.base:
        model, processor = load_base_vlm(args.base), load_processor(args.base)
    else:
        star = load_star(args.ckpt)
        model, processor = star.model.base, star.processor
    result = understanding.understanding_accuracy(model, processor, args.world, args.batch_size, limit=args.limit)
    by_type = ", ".join(f"{q} {v:.3f}" for q, v in result["vqa_accuracy_by_type"].items())
    print(f"VQA accuracy {result['vqa_accuracy']:.4f} over {result['vqa_questions']} questions ({by_type})")
    parts = result["descriptions"]
    fields = ", ".join(f"{field} {share:.2f}" for field, share in parts["per_object"].items())
    print(f"scene descriptions ({parts['descriptions']}): background {parts['background']:.2f}, number of objects "
          f"{parts['object_count']:.2f}; per object in reading order ({parts['objects']}): {fields}")
    print(f"riddle accuracy {result['riddle_accuracy']:.4f} over {result['riddles']} riddles")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def binding_main(argv: list[str]) -> int:
    """``python -m lit_star eval binding --ckpt ... --shards ...``: print (and optionally write) the table."""
    from lit_star.commands.options import add_model_args, load_from_args
    from lit_star.data import ImageTextDataModule
    from lit_star.eval import binding

    parser = argparse.ArgumentParser(prog="python -m lit_star eval binding", description=binding.__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--shards", required=True, help="pre-tokenized Shapes validation shards (codes.npy + txt + json)")
    parser.add_argument("--out", help="write the accuracies to this JSON file")
    args = parser.parse_args(argv)
    star = load_from_args(args)
    data = ImageTextDataModule(val_shards=args.shards, image_key=None, codes_key="codes.npy", batch_size=50,
                               val_batch_size=50, num_workers=0)
    data.setup("validate")
    results = binding.binding_accuracy(binding.star_scorer(star), binding.one_object_rows(data.val_dataloader()))
    print(binding.format_binding(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0
