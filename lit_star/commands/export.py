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
Other stages add their own kind to the ``export`` group of :data:`lit_star.cli.COMMANDS`.
"""

from __future__ import annotations

from typing import Literal


def vq(ckpt: str, out: str, flavour: str | None = None, format: Literal["reference", "safetensors", "both"] = "both") -> int:
    """Export the STAR-VQ tokenizer (EMA weights when the checkpoint has them, codebook projector folded in).

    Args:
        ckpt: VQModule Lightning checkpoint, save_pretrained directory or reference-layout .pt.
        out: output directory.
        flavour: VQ flavour of a reference-layout .pt (e.g. star-vq).
        format: ``reference`` (VQ-Model.pt), ``safetensors`` (model.safetensors + config.json) or ``both``.
    """
    import logging
    import sys

    from lit_star.checkpoints import export_vq, load_vq

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = load_vq(ckpt, flavour)
    try:
        written = export_vq(model, out, format)
    except ValueError as err:
        print(f"export vq: {ckpt}: {err}", file=sys.stderr)
        return 2
    print(f"exported VQ ({len(model.reference_state_dict())} tensors, projector folded) from {ckpt}:")
    for path in written:
        print(f"  {path}")
    return 0


def base(ckpt: str, out: str) -> int:
    """Write the Hugging Face Qwen2.5-VL directory of a stage 0 (BaseVLMModule) checkpoint.

    Args:
        ckpt: BaseVLMModule checkpoint (e.g. runs/shapes/stage0_base/checkpoints/last.ckpt).
        out: output Hugging Face directory.
    """
    from lit_star.checkpoints import export_base_checkpoint

    print(f"wrote {export_base_checkpoint(ckpt, out)}")
    return 0


def diffusion_decoder(ckpt: str, out: str, format: Literal["reference", "directory", "both"] = "both") -> int:
    """Export the stage 3 diffusion decoder; each written file is reloaded and compared tensor by tensor.

    Args:
        ckpt: DiffusionDecoderModule checkpoint or save_decoder directory.
        out: output directory.
        format: ``reference``: ``OUT/diffusion_decoder.pt`` = ``{"state_dict": {"diffusion_decoder.*": ...}}`` (the
            released checkpoints' group; channel conditioning only); ``directory``: ``OUT/`` as ``save_decoder``
            writes it (any conditioning); ``both``.
    """
    from pathlib import Path

    import torch

    from lit_star.checkpoints import export_decoder_reference, load_stage3
    from lit_star.models.diffusion_decoder import load_decoder, save_decoder

    loaded = load_stage3(ckpt)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = loaded.decoder.state_dict()
    if format in ("reference", "both"):
        state = export_decoder_reference(loaded.decoder)
        torch.save(state, out_dir / "diffusion_decoder.pt")
        reread = torch.load(out_dir / "diffusion_decoder.pt", weights_only=True)["state_dict"]
        bad = [k for k, v in state["state_dict"].items() if not torch.equal(reread[k], v)]
        if bad:
            raise RuntimeError(f"export check failed for {bad[:10]}")
        print(f"wrote {out_dir / 'diffusion_decoder.pt'} ({len(state['state_dict'])} tensors)")
    if format in ("directory", "both"):
        save_decoder(loaded.decoder, out_dir, dict(loaded.scheduler.config))
        reread, _ = load_decoder(out_dir)
        bad = [k for k, v in expected.items() if not torch.equal(reread.state_dict()[k], v)]
        if bad:
            raise RuntimeError(f"export check failed for {bad[:10]}")
        print(f"wrote {out_dir} (decoder.json, decoder.safetensors, tokenizer/)")
    return 0
