"""Export trained stages for release or for other tools: ``python -m lit_star export <kind> ...``.

    python -m lit_star export vq --ckpt runs/shapes/stage1_vq/checkpoints/last.ckpt --out exports/shapes_vq --format safetensors
    python -m lit_star export vq --ckpt VQ-Model.pt --flavour star-vq --out exports/star_vq --format safetensors
    python -m lit_star export base --ckpt runs/shapes/stage0_base/checkpoints/last.ckpt --out exports/shapes_base
    python -m lit_star export diffusion-decoder --ckpt runs/shapes/stage3_diffusion_decoder/checkpoints/last.ckpt --out exports/decoder

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

from lit_star.commands._dispatch import dispatch

log = logging.getLogger(__name__)

EXPORTS = {
    "vq": ("STAR-VQ tokenizer: reference-layout VQ-Model.pt and/or safetensors + config.json.",
           "lit_star.commands.export:export_vq"),
    "base": ("Stage 0 base VLM: a Hugging Face Qwen2.5-VL directory rebuilt from a BaseVLMModule checkpoint.",
             "lit_star.commands.export:export_base"),
    "diffusion-decoder": ("Stage 3 decoder: reference-layout diffusion_decoder.* and/or a save_decoder directory.",
                          "lit_star.commands.export:export_diffusion_decoder"),
}


def export_diffusion_decoder(argv: list[str]) -> int:
    """``--format reference``: ``OUT/diffusion_decoder.pt`` = ``{"state_dict": {"diffusion_decoder.*": ...}}``
    (the released checkpoints' group; channel conditioning only); ``--format directory``: ``OUT/`` as
    ``save_decoder`` writes it (any conditioning). Each file is reloaded and compared tensor by tensor."""
    import torch

    from lit_star.checkpoints import export_decoder_reference, load_stage3
    from lit_star.models.diffusion_decoder import load_decoder, save_decoder

    parser = argparse.ArgumentParser(prog="python -m lit_star export diffusion-decoder",
                                     description=export_diffusion_decoder.__doc__)
    parser.add_argument("--ckpt", required=True, help="DiffusionDecoderModule checkpoint or save_decoder directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=["reference", "directory", "both"], default="both")
    args = parser.parse_args(argv)
    from pathlib import Path

    loaded = load_stage3(args.ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    expected = loaded.decoder.state_dict()
    if args.format in ("reference", "both"):
        state = export_decoder_reference(loaded.decoder)
        torch.save(state, out / "diffusion_decoder.pt")
        reread = torch.load(out / "diffusion_decoder.pt", weights_only=True)["state_dict"]
        bad = [k for k, v in state["state_dict"].items() if not torch.equal(reread[k], v)]
        if bad:
            raise RuntimeError(f"export check failed for {bad[:10]}")
        print(f"wrote {out / 'diffusion_decoder.pt'} ({len(state['state_dict'])} tensors)")
    if args.format in ("directory", "both"):
        save_decoder(loaded.decoder, out, dict(loaded.scheduler.config))
        reread, _ = load_decoder(out)
        bad = [k for k, v in expected.items() if not torch.equal(reread.state_dict()[k], v)]
        if bad:
            raise RuntimeError(f"export check failed for {bad[:10]}")
        print(f"wrote {out} (decoder.json, decoder.safetensors, tokenizer/)")
    return 0


def export_vq(argv: list[str]) -> int:
    from lit_star.checkpoints import export_vq as write_vq
    from lit_star.checkpoints import load_vq

    parser = argparse.ArgumentParser(prog="python -m lit_star export vq", description="Export the STAR-VQ tokenizer.")
    parser.add_argument("--ckpt", required=True,
                        help="VQModule Lightning checkpoint, save_pretrained directory or reference-layout .pt")
    parser.add_argument("--flavour", default=None, help="VQ flavour of a reference-layout .pt (e.g. star-vq)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=["reference", "safetensors", "both"], default="both")
    args = parser.parse_args(argv)

    model = load_vq(args.ckpt, args.flavour)
    try:
        written = write_vq(model, args.out, args.format)
    except ValueError as err:
        parser.error(f"{args.ckpt}: {err}")
    print(f"exported VQ ({len(model.reference_state_dict())} tensors, projector folded) from {args.ckpt}:")
    for path in written:
        print(f"  {path}")
    return 0


def export_base(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_star export base")
    parser.add_argument("--ckpt", required=True, help="BaseVLMModule checkpoint (e.g. runs/shapes/stage0_base/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    args = parser.parse_args(argv)
    from lit_star.checkpoints import export_base_checkpoint

    print(f"wrote {export_base_checkpoint(args.ckpt, args.out)}")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return dispatch("export", EXPORTS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
