"""Sample a stage 2 checkpoint: text-to-image, editing and understanding.

    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "a red circle above a blue square" --out samples
    python -m lit_star generate --ckpt runs/star3b --prompts prompts.jsonl --out samples --sampler.cfg_scale 3 \\
        --sampler.top_k 1000 --sampler.top_p 0.8 --seed 0 --batch_size 8
    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "the colour of a lemon, the shape of the sun" \\
        --reasoning true --out samples
    python -m lit_star edit --ckpt runs/stage2/last.ckpt --image in.png --instruction "make the circle green" --out edits
    python -m lit_star understand --ckpt runs/stage2/last.ckpt --image in.png --question "How many circles are there?"
    python -m lit_star generate --ckpt runs/stage2/last.ckpt --prompt "a red circle" --out samples \\
        --decoder.kind diffusion --decoder.ckpt runs/stage3/last.ckpt --decoder.size 128      # stage 3 decodes the codes
    python -m lit_star generate --ckpt runs/stage4/last.ckpt --prompt "a red circle" --out samples \\
        --decoder.kind diffusion --decoder.ckpt runs/stage4/last.ckpt     # stage 4: its stack draws, its decoder decodes

``--ckpt`` is a stage 2 checkpoint: our Lightning ``.ckpt`` or a ``save_stacked_ar`` / ``import-reference``
directory (see :mod:`lit_star.sampling.loading`), or a stage 4 ``.ckpt``, whose stack is used (and whose
decoder, given again as ``--decoder.ckpt``). ``--prompts`` is JSONL, one ``{"prompt": ..., "id": ...,
"seed": ...}`` per line (``id`` and ``seed`` optional). Images go to ``OUT/<id>.png`` and every generated
item, with the settings used, to ``OUT/generations.jsonl`` (``edits.jsonl``, ``answers.jsonl``).
Sample i is drawn with seed ``--seed + i`` unless its record gives one, so a seed reproduces its image at
any ``--batch_size``. Each job also takes ``--config job.yaml``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from lit_star.commands.options import ModelOverrides, PixelDecoder, load_model, load_pixel_decoder
from lit_star.sampling.decoding import DecodeOptions
from lit_star.sampling.filtering import SamplerConfig
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
    REFERENCE_MAX_ANSWER_TOKENS,
    Star,
    answer_questions,
    codes_to_images,
    edit_codes,
)


def _load_for_drawing(ckpt: str, model: ModelOverrides, command: str) -> Star | None:
    """The checkpoint, or None after telling the user it lacks the image size that drawing needs."""
    star = load_model(ckpt, model)
    if star.image_size is None:
        print(f"{command}: {ckpt} does not record its image size; pass --model.image_size", file=sys.stderr)
        return None
    return star


def generate(
    ckpt: str,
    out: str,
    prompt: str | list[str] | None = None,
    prompts: str | None = None,
    model: ModelOverrides = ModelOverrides(),
    sampler: SamplerConfig = SamplerConfig(),
    decode: DecodeOptions = DecodeOptions(),
    seed: int = 0,
    batch_size: int = 8,
    reasoning: bool = False,
    reasoning_suffix: str | None = None,
    max_answer_tokens: int = REFERENCE_MAX_ANSWER_TOKENS,
    decoder: PixelDecoder = PixelDecoder(),
) -> int:
    """Text-to-image with a stage 2 checkpoint, optionally with implicit reasoning.

    Args:
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar/import-reference directory) or stage 4 .ckpt.
        out: output folder (``<id>.png`` and ``generations.jsonl``).
        prompt: a prompt (``--prompt "a red circle"``) or a list of them (``--prompt '[a red circle, a blue star]'``).
        prompts: JSONL file of ``{"prompt", "id"?, "seed"?}`` records.
        model: overrides of what the checkpoint records.
        sampler: how each image token is drawn.
        decode: how the decode loop runs.
        seed: sample i uses seed + i unless its record sets one.
        batch_size: samples decoded together (x2 rows with guidance).
        reasoning: the base answers the prompt first; its answer is drawn.
        reasoning_suffix: appended to the base's answer (default: the checkpoint's recorded one; the reference's
            quality phrase for imported STAR weights and checkpoints that record none).
        max_answer_tokens: the base's answer budget with ``reasoning`` (the reference's 256 new tokens).
        decoder: which decoder turns the codes into pixels (the VQ's, or stage 3's diffusion decoder).
    """
    try:
        given = [prompt] if isinstance(prompt, str) else list(prompt or [])
        records = [{"prompt": p} for p in given] + (read_prompt_records(prompts) if prompts else [])
        if not records:
            raise ValueError("give --prompt and/or --prompts")
        records = assign_ids_and_seeds(records, seed)
        check_batch_size(batch_size)
    except (OSError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    star = _load_for_drawing(ckpt, model, "generate")
    if star is None:
        return 2
    render, extra = None, {"ckpt": str(ckpt), "decoder": decoder.kind}
    try:
        stage3 = load_pixel_decoder(decoder, star, model, edit=False)
        if stage3 is not None:
            from lit_star.sampling.diffusion import diffusion_renderer

            render = diffusion_renderer(stage3.decoder, stage3.scheduler, star.vq, stage3.size, stage3.settings)
            extra.update(stage3.record())
    except (OSError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    write_generations(
        star, records, Path(out), sampler, decode, batch_size,
        reasoning_suffix=(star.reasoning_suffix if reasoning_suffix is None else reasoning_suffix) if reasoning else None,
        max_answer_tokens=max_answer_tokens, extra_settings=extra, render=render,
    )
    print(f"wrote {len(records)} image(s) and generations.jsonl to {out}")
    return 0


def _open_image(path: str):
    from lit_star.data.images import decode_image

    return decode_image(Path(path).read_bytes())


def edit(
    ckpt: str,
    image: str,
    instruction: str,
    out: str,
    num_images: int = 1,
    model: ModelOverrides = ModelOverrides(),
    sampler: SamplerConfig = SamplerConfig(),
    decode: DecodeOptions = DecodeOptions(),
    seed: int = 0,
    batch_size: int = 8,
    decoder: PixelDecoder = PixelDecoder(),
) -> int:
    """Edit one image with an instruction using a stage 2 checkpoint.

    Args:
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar/import-reference directory) or stage 4 .ckpt.
        image: source image.
        instruction: what to change.
        out: output folder (``edit_<seed>.png`` and ``edits.jsonl``).
        num_images: edits to draw (seeds ``seed``, ``seed + 1``, ...).
        model: overrides of what the checkpoint records.
        sampler: how each image token is drawn.
        decode: how the decode loop runs.
        seed: the first edit's seed.
        batch_size: edits decoded together (x2 rows with guidance).
        decoder: which decoder turns the codes into pixels (the VQ's, or stage 3's diffusion decoder).
    """
    try:
        source = _open_image(image)
        check_batch_size(batch_size)
        if num_images < 1:
            raise ValueError(f"--num_images must be >= 1, got {num_images}")
    except (OSError, ValueError) as err:
        print(f"edit: {err}", file=sys.stderr)
        return 2
    star = _load_for_drawing(ckpt, model, "edit")
    if star is None:
        return 2
    try:
        stage3 = load_pixel_decoder(decoder, star, model, edit=True)
    except (OSError, ValueError) as err:
        print(f"edit: {err}", file=sys.stderr)
        return 2
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**sampler.as_dict(), "ckpt": str(ckpt), "image_size": star.image_size, "decoder": decoder.kind}
    if stage3 is not None:
        settings.update(stage3.record())
    seeds = [seed + i for i in range(num_images)]
    bar, progress = token_bar(star, len(seeds), "edit")
    with open(out_dir / "edits.jsonl", "w", encoding="utf-8") as log:
        for batch in batches(seeds, batch_size):
            codes = edit_codes(star, [source] * len(batch), [instruction] * len(batch), sampler, batch, decode, progress)
            if stage3 is None:
                images = codes_to_images(star.vq, codes)
            else:
                images = _diffusion_edit(stage3, star, source, instruction, batch, codes)
            files = save_images(images, [f"edit_{s}" for s in batch], out_dir)
            for sample_seed, file in zip(batch, files):
                record = {"source": image, "instruction": instruction, "seed": sample_seed, "image": file}
                log.write(json.dumps({**record, "settings": settings}) + "\n")
    bar.close()
    print(f"wrote {len(seeds)} edit(s) and edits.jsonl to {out}")
    return 0


def _diffusion_edit(stage3, star: Star, source, instruction: str, seeds, codes):
    """The stage 3 decoder's edit: the source stretched to the output size (as in training and the reference's
    get_full_transform), the stack's codes as the VQ pass."""
    from lit_star.data.images import to_rgb
    from lit_star.models.edit_source import image_to_tensor, stretch_to_square
    from lit_star.sampling.diffusion import edit_with_diffusion, to_pil

    tensor = image_to_tensor(stretch_to_square(to_rgb(source), stage3.size))
    images = edit_with_diffusion(stage3.decoder, stage3.scheduler, tensor[None].expand(len(seeds), -1, -1, -1),
                                 [instruction] * len(seeds), list(seeds), vq=star.vq, codes=codes,
                                 settings=stage3.settings)
    return to_pil(images)


def understand(
    ckpt: str,
    question: str,
    image: str | None = None,
    max_new_tokens: int = 64,
    out: str | None = None,
    model: ModelOverrides = ModelOverrides(),
) -> int:
    """The frozen base of a stage 2 checkpoint answers a question about an image (greedy).

    Args:
        ckpt: stage 2 checkpoint (Lightning .ckpt or save_stacked_ar/import-reference directory) or stage 4 .ckpt.
        question: the question.
        image: image the question is about (omit for a text-only question).
        max_new_tokens: answer budget.
        out: also append the answer to ``OUT/answers.jsonl``.
        model: overrides of what the checkpoint records.
    """
    try:
        images = None if image is None else [_open_image(image)]
    except (OSError, ValueError) as err:
        print(f"understand: {err}", file=sys.stderr)
        return 2
    star = load_model(ckpt, model)
    with tqdm(total=1, unit="answer", desc="understand") as bar:
        answer = answer_questions(star, [question], images, max_new_tokens=max_new_tokens)[0]
        bar.update(1)
    print(answer)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        record = {"image": image, "question": question, "answer": answer,
                  "settings": {"ckpt": str(ckpt), "max_new_tokens": max_new_tokens, "decoding": "greedy"}}
        with open(Path(out) / "answers.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
    return 0
