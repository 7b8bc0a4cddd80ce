"""Evaluation jobs.

    python -m lit_star eval shapes --prompts runs/shapes_world/eval/geneval.jsonl --images runs/shapes_world/eval/geneval_gt
    python -m lit_star eval shapes --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt --world runs/shapes_world \
        --out runs/shapes/eval --sampler.cfg_scale 4 --sampler.top_k 16 --sampler.top_p 1.0
    python -m lit_star eval shapes --ckpt runs/shapes/stage4_unified/checkpoints/last.ckpt --world runs/shapes_world \
        --out runs/shapes/eval_stage4 --decoder.kind diffusion --decoder.ckpt runs/shapes/stage4_unified/checkpoints/last.ckpt
    python -m lit_star eval shapes --vq runs/shapes/stage1_vq/checkpoints/last.ckpt --world runs/shapes_world
    python -m lit_star eval understanding --base runs/shapes/stage0_base/hf --world runs/shapes_world
    python -m lit_star eval binding --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \
        --shards 'runs/shapes_world/t2i_codes/val-*.tar'

Each job also takes ``--config job.yaml``. Heavy modules are imported inside the jobs, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from lit_star.commands.options import ModelOverrides, PixelDecoder
from lit_star.sampling.decoding import DecodeOptions
from lit_star.sampling.filtering import SamplerConfig


def shapes(
    prompts: str | None = None,
    images: str | None = None,
    task: Literal["auto", "geneval", "edit"] = "auto",
    ckpt: str | None = None,
    world: str | None = None,
    out: str | None = None,
    model: ModelOverrides = ModelOverrides(),
    sampler: SamplerConfig = SamplerConfig(),
    decode: DecodeOptions = DecodeOptions(),
    decoder: PixelDecoder = PixelDecoder(),
    seed: int = 0,
    batch_size: int = 8,
    geneval: bool = True,
    knowledge: bool = True,
    edits: bool = False,
    per_category: int | None = None,
    seen_combinations: int = 0,
    seen_riddles: int = 0,
    seen: bool = True,
    development: bool = False,
    reasoning_suffix: str | None = None,
    vq: str | None = None,
    vq_flavour: str | None = None,
    fail_below_target: bool = True,
) -> int:
    """ShapesEval: score a folder of images (``prompts`` + ``images``), generate the world's eval sets with a
    stage 2 checkpoint first (``ckpt`` + ``world`` + ``out``), or score a VQ's reconstructions of the world's
    ground truth (``vq`` + ``world``).

    Args:
        prompts: eval JSONL to score images against: geneval.jsonl, knowledge.jsonl or edit.jsonl.
        images: folder of images named ``<id>.png``.
        task: ``auto``: edit when the records carry source/target scenes.
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar/import-reference directory): generate first.
        world: Shapes world directory whose ``eval/`` sets are generated (with ``ckpt``).
        out: with ``ckpt``, the folder for images, grids and results.json; otherwise where to write the scores
            (with per-prompt reasons) as JSON.
        model: overrides of what the checkpoint records.
        sampler: how each image token is drawn.
        decode: how the decode loop runs.
        decoder: with ``--decoder.kind diffusion --decoder.ckpt`` (a stage 3 or stage 4 checkpoint), the
            GenEval-style sets' codes are also decoded by that diffusion decoder and scored beside the VQ decoder
            (folders ``<set>_diffusion/``, results keys ``<set>_diffusion``): two decoders on the same samples.
        seed: sample i uses seed + i unless its record sets one.
        batch_size: samples decoded together (x2 rows with guidance).
        geneval: generate the held-out GenEval-style set (off: run it in another process).
        seen: generate the seen-pair GenEval-style set (``eval/geneval_seen.jsonl``); it and the held-out set
            are ShapesEval's two headline scores.
        development: generate the seen-pair development set (``eval/geneval_seen_dev.jsonl``), the set on
            which to choose sampler settings (never on either scored set).
        knowledge: generate the riddle sets, with and without reasoning.
        edits: also run the edit set (needs an edit-trained stack).
        per_category: only the first N prompts of each category (smoke runs).
        seen_combinations: also score N control prompts per category built from colour/shape pairs seen in
            training.
        seen_riddles: also score N riddles per category whose answers name seen pairs, with and without reasoning.
        reasoning_suffix: appended to the base's answer in reasoning mode (default: the checkpoint's recorded
            one, empty for Shapes stacks; the reference's quality phrase for imported STAR weights).
        vq: a VQ checkpoint (``load_vq`` formats): score its reconstructions of the world's ground truth instead
            (``world`` needed; ``out`` keeps the reconstructions). ShapesEval of them should be >= 0.98 in
            every category; PSNR, utilisation and perplexity are printed beside it.
        vq_flavour: flavour of a reference-layout VQ-Model.pt given with ``vq``.
        fail_below_target: with ``vq``, exit 1 when a category scores under the target (a gate for scripts);
            off, the scores are only reported (the curriculum's report step).
    """
    if vq is not None:
        if ckpt is not None or world is None:
            print("eval shapes: --vq scores a VQ's reconstructions of --world's ground truth; give --world, "
                  "not --ckpt", file=sys.stderr)
            return 2
        import torch

        from lit_star.checkpoints import load_vq
        from lit_star.eval.vq_shapes import vq_reconstruction_eval

        torch.set_num_threads(model.threads)
        try:
            vq_model = load_vq(vq, vq_flavour)
            result = vq_reconstruction_eval(vq_model, world, out, batch_size=batch_size, per_category=per_category)
        except (OSError, ValueError, KeyError) as err:
            print(f"eval shapes: {err}", file=sys.stderr)
            return 2
        return 0 if result["meets_target"] or not fail_below_target else 1
    if ckpt is not None:
        if world is None or out is None:
            print("eval shapes: with --ckpt, give --world and --out", file=sys.stderr)
            return 2
        from lit_star.commands.options import load_model, load_pixel_decoder
        from lit_star.eval.shapes import evaluate_on_shapes

        try:
            star = load_model(ckpt, model)
            also_render = None
            diffusion = load_pixel_decoder(decoder, star, model, edit=False)
            if diffusion is not None:
                from lit_star.sampling.diffusion import diffusion_renderer

                also_render = {"diffusion": diffusion_renderer(diffusion.decoder, diffusion.scheduler, star.vq,
                                                               diffusion.size, diffusion.settings)}
            evaluate_on_shapes(
                star, world, out, sampler, decode, batch_size, seed, edits=edits, knowledge=knowledge,
                per_category=per_category, seen_combinations=seen_combinations, seen_riddles=seen_riddles,
                geneval=geneval, seen=seen, development=development, reasoning_suffix=reasoning_suffix,
                also_render=also_render,
            )
        except (FileNotFoundError, ValueError) as err:
            print(f"eval shapes: {err}", file=sys.stderr)
            return 2
        return 0
    if prompts is None or images is None:
        print("eval shapes: give --prompts and --images to score a folder, or --ckpt to generate first", file=sys.stderr)
        return 2
    return _score_folder(prompts, images, task, out)


def _score_folder(prompts: str, images: str, task: str, out: str | None) -> int:
    from lit_star.worlds.shapes import scorer

    if not Path(images).is_dir():
        print(f"eval shapes: --images {images} is not a folder", file=sys.stderr)
        return 2
    try:
        records = scorer.load_prompts(prompts)
    except (OSError, ValueError) as err:
        print(f"eval shapes: {err}", file=sys.stderr)
        return 2
    if task == "auto":
        task = "edit" if "target" in records[0] else "geneval"
    try:
        result = scorer.score_edits(records, images) if task == "edit" else scorer.score_geneval(records, images)
    except ValueError as err:
        print(f"eval shapes: {prompts}: {err}", file=sys.stderr)
        return 2
    print(scorer.format_table(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if len(result["missing"]) == len(records):
        print(f"eval shapes: no image of {prompts} was found in {images}", file=sys.stderr)
        return 1
    return 0


def understanding(
    world: str,
    base: str | None = None,
    ckpt: str | None = None,
    out: str | None = None,
    batch_size: int = 50,
    limit: int | None = None,
) -> int:
    """VQA and riddle accuracy of a base VLM, or of the frozen base inside a stage 2 checkpoint.

    Args:
        world: Shapes world directory.
        base: Hugging Face Qwen2.5-VL directory (e.g. the stage 0 export); give this or ``ckpt``.
        ckpt: stage 2 checkpoint whose frozen base is evaluated.
        out: write the scores and every answer as JSON here.
        batch_size: questions answered together.
        limit: at most this many VQA questions and riddles (smoke runs).
    """
    if (base is None) == (ckpt is None):
        print("eval understanding: give exactly one of --base and --ckpt", file=sys.stderr)
        return 2
    import torch

    from lit_star.eval.understanding import understanding_accuracy
    from lit_star.models.base_vlm import load_base_vlm, load_processor
    from lit_star.sampling.loading import load_star

    torch.set_num_threads(1)
    if base is not None:
        model, processor = load_base_vlm(base), load_processor(base)
    else:
        star = load_star(ckpt)
        model, processor = star.model.base, star.processor
    result = understanding_accuracy(model, processor, world, batch_size, limit=limit)
    by_type = ", ".join(f"{q} {v:.3f}" for q, v in result["vqa_accuracy_by_type"].items())
    print(f"VQA accuracy {result['vqa_accuracy']:.4f} over {result['vqa_questions']} questions ({by_type})")
    parts = result["descriptions"]
    fields = ", ".join(f"{field} {share:.2f}" for field, share in parts["per_object"].items())
    print(f"scene descriptions ({parts['descriptions']}): background {parts['background']:.2f}, number of objects "
          f"{parts['object_count']:.2f}; per object in reading order ({parts['objects']}): {fields}")
    print(f"riddle accuracy {result['riddle_accuracy']:.4f} over {result['riddles']} riddles")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def binding(ckpt: str, shards: str, out: str | None = None, model: ModelOverrides = ModelOverrides()) -> int:
    """How often a stage 2 model prefers a one-object image's own caption over the same caption with another
    colour (or shape), overall and by grid row.

    Args:
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar/import-reference directory).
        shards: pre-tokenized Shapes validation shards (codes.npy + txt + json).
        out: write the accuracies to this JSON file.
        model: overrides of what the checkpoint records.
    """
    from lit_star.commands.options import load_model
    from lit_star.data import ImageTextDataModule
    from lit_star.eval.binding import binding_accuracy, format_binding, one_object_rows, star_scorer

    star = load_model(ckpt, model)
    data = ImageTextDataModule(val_shards=shards, image_key=None, codes_key="codes.npy", batch_size=50,
                               val_batch_size=50, num_workers=0)
    data.setup("validate")
    results = binding_accuracy(star_scorer(star), one_object_rows(data.val_dataloader()))
    print(format_binding(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


def decoders(
    world: str,
    vq: str,
    out: str,
    stage3: list[str] = [],
    size: int | None = None,
    steps: int = 40,
    guidance: float = 4.5,
    image_guidance: float = 1.05,
    shift: float | None = None,
    features: str | None = None,
    limit: int | None = None,
    threads: int = 1,
) -> int:
    """Table 7a in small: the VQ decoder against stage 3 diffusion decoders on ShapesEval's ground-truth codes.

    Args:
        world: Shapes world directory (its eval ground truth is encoded and decoded).
        vq: the VQ checkpoint whose codes are decoded.
        out: output folder (images per decoder and results.json).
        stage3: stage 3 checkpoints to compare (a list).
        size: output side (default: the ground-truth size; larger: super-resolution).
        steps: Euler steps of the diffusion decoders.
        guidance: their text guidance.
        image_guidance: their image guidance.
        shift: sampling-time scheduler shift (default: the trained one).
        features: torch.export feature network for the Fréchet distance.
        limit: prompts per category (default: all).
        threads: CPU threads.
    """
    import torch

    from lit_star.eval.decoders import compare_decoders, format_comparison
    from lit_star.sampling.diffusion import GuidanceSettings

    torch.set_num_threads(threads)
    results = compare_decoders(Path(world), vq, list(stage3), Path(out), size,
                               GuidanceSettings(steps, guidance, image_guidance, shift=shift), features, limit)
    print(format_comparison(results))
    print(f"wrote {Path(out) / 'results.json'}")
    return 0
