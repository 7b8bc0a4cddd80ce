"""Decode VQ codes into images with the VQ decoder or the stage 3 diffusion decoder, at any output size.

    python -m lit_star decode --decoder vq --vq runs/shapes/stage1_vq/checkpoints/last.ckpt \\
        --shards 'runs/shapes_world/t2i_codes/val-*.tar' --out decoded/vq
    python -m lit_star decode --decoder diffusion --ckpt runs/shapes/stage3_diffusion_decoder/checkpoints/last.ckpt \\
        --shards 'runs/shapes_world/t2i_codes/val-*.tar' --size 128 --out decoded/sr128 --limit 64
    python -m lit_star decode --decoder diffusion --ckpt runs/star3b/diffusion_decoder --vq runs/star3b/vq \\
        --codes grid.npy --prompt "a cat" --size 1024 --out decoded/cat          # 24 x 24 codes -> 1024 px

``--codes`` is one ``.npy`` grid (h x w) or a batch (B x h x w); ``--shards`` are code shards written by
``python -m lit_star tokenize`` (their captions are the prompts; ``--codes_key`` names the member). Images go to
``OUT/<key>.png``, one ``OUT/decoded.jsonl`` row each with the settings. The diffusion decoder draws sample i
with seed ``seed + i``; its output side must be a multiple of the pixels per DiT patch (STAR: 16).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch


def read_code_items(args: SimpleNamespace) -> list[dict]:
    """``{"key", "codes" (h x w int64), "prompt"}`` from ``--codes`` or ``--shards``."""
    items = []
    if args.codes:
        grid = np.load(args.codes)
        grids = grid[None] if grid.ndim == 2 else grid
        if grids.ndim != 3:
            raise ValueError(f"{args.codes}: expected an h x w or B x h x w array, got shape {grid.shape}")
        for i, g in enumerate(grids):
            items.append({"key": f"{Path(args.codes).stem}_{i:03d}", "codes": torch.from_numpy(g.astype(np.int64)),
                          "prompt": args.prompt or ""})
    if args.shards:
        from lit_star.data import ImageTextDataModule

        data = ImageTextDataModule(train_shards=args.shards, image_key=None, codes_key=args.codes_key,
                                   meta_key=None, batch_size=1, shuffle_buffer=0, shuffle_shards=False)
        for batch in data.train_dataloader():
            items.append({"key": batch["__key__"][0], "codes": batch["codes"][0].long(),
                          "prompt": args.prompt or batch["caption"][0]})
            if args.limit and len(items) >= args.limit:
                break
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise ValueError("no codes: give --codes and/or --shards")
    return items


def decode(
    out: str,
    decoder: Literal["vq", "diffusion"],
    ckpt: str | None = None,
    vq: str | None = None,
    vq_flavour: str | None = None,
    codes: str | None = None,
    shards: str | None = None,
    codes_key: str = "codes.npy",
    prompt: str | None = None,
    limit: int = 0,
    size: int | None = None,
    steps: int = 40,
    guidance: float = 4.5,
    image_guidance: float = 1.05,
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    threads: int = 1,
) -> int:
    """Decode VQ code grids or code shards with the VQ decoder or the stage 3 diffusion decoder, at any size.

    Args:
        out: output folder (``<key>.png`` and ``decoded.jsonl``).
        decoder: ``vq`` or ``diffusion``.
        ckpt: stage 3 checkpoint (DiffusionDecoderModule .ckpt or save_decoder directory), with ``diffusion``.
        vq: VQ checkpoint (required for ``vq``; overrides the stage 3 record).
        vq_flavour: VQ flavour of a reference-layout VQ-Model.pt.
        codes: .npy code grid(s), h x w or B x h x w.
        shards: code shards (e.g. ``'runs/shapes_world/t2i_codes/val-*.tar'``).
        codes_key: the shard member holding the codes.
        prompt: prompt for every grid (default: the shard captions, or '').
        limit: decode at most this many grids (0: all).
        size: output side in pixels (default: the code grid x the VQ's downsampling).
        steps: Euler steps of the diffusion decoder.
        guidance: its text guidance.
        image_guidance: its image guidance.
        shift: sampling-time scheduler shift (default: the trained one).
        seed: grid i is drawn with seed + i.
        batch_size: grids decoded together.
        threads: CPU threads.
    """
    args = SimpleNamespace(**{**locals(), "out": Path(out)})
    torch.set_num_threads(args.threads)
    try:
        if args.decoder == "diffusion" and not args.ckpt:
            raise ValueError("--decoder diffusion needs --ckpt (a stage 3 checkpoint)")
        if args.decoder == "vq" and not args.vq:
            raise ValueError("--decoder vq needs --vq")
        items = read_code_items(args)
    except (OSError, ValueError) as err:
        print(f"decode: {err}", file=sys.stderr)
        return 2
    written = decode_items(args, items)
    print(f"decoded {written} grid(s) with the {args.decoder} decoder into {args.out}")
    return 0


def decode_items(args: SimpleNamespace, items: list[dict]) -> int:
    from lit_star.checkpoints import load_stage3, load_vq
    from lit_star.sampling.diffusion import GuidanceSettings, decode_codes_with_diffusion, to_pil

    args.out.mkdir(parents=True, exist_ok=True)
    if args.decoder == "diffusion":
        stage3 = load_stage3(args.ckpt, vq=args.vq, vq_flavour=args.vq_flavour)
        vq = stage3.vq
        if vq is None:
            raise SystemExit("decode: the stage 3 source records no VQ; pass --vq")
        settings = GuidanceSettings(args.steps, args.guidance, args.image_guidance, shift=args.shift)
    else:
        vq, settings = load_vq(args.vq, args.vq_flavour), None
    with open(args.out / "decoded.jsonl", "w", encoding="utf-8") as log:
        for start in range(0, len(items), args.batch_size):
            batch = items[start: start + args.batch_size]
            codes = torch.stack([item["codes"] for item in batch])
            size = args.size or codes.shape[-1] * vq.config.downsample_factor
            if args.decoder == "diffusion":
                seeds = [args.seed + start + i for i in range(len(batch))]
                images = decode_codes_with_diffusion(stage3.decoder, stage3.scheduler, vq, codes,
                                                     [item["prompt"] for item in batch], seeds, size, settings)
            else:
                with torch.no_grad():
                    images = vq.decode_codes(codes).float().clamp(-1, 1)
                if images.shape[-1] != size:
                    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic",
                                                             align_corners=False).clamp(-1, 1)
            for item, image in zip(batch, to_pil(images)):
                image.save(args.out / f"{item['key']}.png")
                row = {"key": item["key"], "prompt": item["prompt"], "image": f"{item['key']}.png",
                       "decoder": args.decoder, "size": size}
                if settings is not None:
                    row["settings"] = settings.as_dict()
                log.write(json.dumps(row) + "\n")
    return len(items)
