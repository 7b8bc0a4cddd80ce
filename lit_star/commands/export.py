"""Export trained stages for release or for other tools: ``python -m lit_star export <kind> ...``.

    python -m lit_star export vq --ckpt runs/shapes/stage1_vq/checkpoints/last.ckpt --out exports/shapes_vq --format safetensors
    python -m lit_star export vq --ckpt VQ-Model.pt --flavour star-vq --out exports/star_vq --format safetensors
    python -m lit_star export base --ckpt runs/shapes/stage0_base/checkpoints/last.ckpt --out exports/shapes_base

``vq`` writes the tokenizer (EMA weights when the checkpoint has them, codebook projector folded in):

* ``--format reference``: ``OUT/VQ-Model.pt``, a raw state dict in the reference (MM-MVR/STAR) layout;
* ``--format safetensors``: ``OUT/model.safetensors`` + ``OUT/config.json``, read by
  ``VQModel.from_pretrained(OUT)``;
* ``--format both`` (default): all three files.

A VQ with ``local_encoder`` (the Shapes recipe's) exports as safetensors only: the reference code would
build its global encoder around a ``VQ-Model.pt``.

Every written file is reloaded strictly and compared tensor by tensor before the command succeeds.
Other stages register their own kind in ``EXPORTS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lit_star.commands._dispatch import dispatch

log = logging.getLogger(__name__)

REFERENCE_VQ_FILE = "VQ-Model.pt"

EXPORTS = {
    "vq": ("STAR-VQ tokenizer: reference-layout VQ-Model.pt and/or safetensors + config.json.",
           "lit_star.commands.export:export_vq"),
    "base": ("Stage 0 base VLM: a Hugging Face Qwen2.5-VL directory rebuilt from a BaseVLMModule checkpoint.",
             "lit_star.commands.export:export_base"),
}


def export_vq(argv: list[str]) -> int:
    import torch

    from lit_star.commands.tokenize import load_vq
    from lit_star.models.vq import CONFIG_FILE, WEIGHTS_FILE, VQModel

    parser = argparse.ArgumentParser(prog="python -m lit_star export vq", description="Export the STAR-VQ tokenizer.")
    parser.add_argument("--ckpt", required=True,
                        help="VQModule Lightning checkpoint, save_pretrained directory or reference-layout .pt")
    parser.add_argument("--flavour", default=None, help="VQ flavour of a reference-layout .pt (e.g. star-vq)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=["reference", "safetensors", "both"], default="both")
    args = parser.parse_args(argv)

    model = load_vq(args.ckpt, args.flavour)
    if model.config.local_encoder and args.format != "safetensors":
        parser.error(f"{args.ckpt} has a local encoder (VQConfig.local_encoder), which the reference code cannot "
                     "build: a VQ-Model.pt would load into a different encoder. Use --format safetensors.")
    state = model.reference_state_dict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    reloaded: list[tuple[Path, VQModel]] = []
    if args.format in ("reference", "both"):
        target = out / REFERENCE_VQ_FILE
        torch.save(state, target)
        written.append(target)
        reloaded.append((target, VQModel.from_pretrained(target, model.exported_config())))
    if args.format in ("safetensors", "both"):
        model.save_pretrained(out)
        written += [out / WEIGHTS_FILE, out / CONFIG_FILE]
        reloaded.append((out, VQModel.from_pretrained(out)))
    for source, copy in reloaded:
        copy_state = copy.state_dict()
        different = sorted(k for k in state if not torch.equal(state[k], copy_state[k].to(state[k].dtype)))
        if different:
            raise RuntimeError(f"export check failed: {source} reloads with different tensors {different[:10]}")
    print(f"exported VQ ({len(state)} tensors, projector folded) from {args.ckpt}:")
    for path in written:
        print(f"  {path}")
    return 0


def export_base(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_star export base")
    parser.add_argument("--ckpt", required=True, help="BaseVLMModule checkpoint (e.g. runs/shapes/stage0_base/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    args = parser.parse_args(argv)
    from lit_star.modules.base_module import export_base_checkpoint

    print(f"wrote {export_base_checkpoint(args.ckpt, args.out)}")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return dispatch("export", EXPORTS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
