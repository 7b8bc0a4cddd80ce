"""Import a released STAR checkpoint (MM-MVR/STAR layout) with exact key coverage.

    python -m lit_star import-reference --ckpt STAR-3B.pt --base checkpoints/Qwen2.5-VL-3B-Instruct --out runs/star3b

Writes into ``--out``:
  stacked_ar.safetensors + stacked_ar.json   stack, adapter and pixel head (load with
                                             ``lit_star.models.stacked_ar.load_stacked_ar``)
  vq/                                        the ``pixel_encoder.*`` VQ (``VQModel.from_pretrained``)
  diffusion_decoder/                          with --lumina: ``diffusion_decoder.*`` loaded strictly into a
                                             DiffusionDecoder (``generate --decoder.kind diffusion`` reads it)
  diffusion_decoder.safetensors              without --lumina: ``diffusion_decoder.*`` as stored
  import_report.json                         key coverage per group

The checkpoint's ``llm.*`` must equal the weights in ``--base`` (STAR keeps its base frozen); any
difference, any missing or unexpected key, or any shape mismatch is an error that names the keys.
"""

from __future__ import annotations

from pathlib import Path

from lit_star.checkpoints import import_reference as import_reference_checkpoint


def import_reference(ckpt: str, base: str, out: str, vq_config: str = "star-vq", lumina: str | None = None) -> int:
    """Import a released STAR checkpoint (MM-MVR/STAR layout) with exact key coverage.

    Args:
        ckpt: released STAR checkpoint (STAR-3B.pt / STAR-7B.pt).
        base: local Qwen2.5-VL Hugging Face directory the checkpoint was trained on.
        out: output directory.
        vq_config: VQ flavour of ``pixel_encoder.*`` (``lit_star.models.vq``).
        lumina: Lumina-Image-2.0 directory giving the diffusion decoder's architecture (configs, tokenizer,
            scheduler); then ``diffusion_decoder.*`` must match it key for key.
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = import_reference_checkpoint(Path(ckpt), Path(base), out_dir, vq_config,
                                         Path(lumina) if lumina is not None else None)
    stack, stacked = report["stack"], report["coverage"]["stacked_ar"]
    print(
        f"imported {ckpt}: {report['keys_in_checkpoint']} keys, {report['keys_accounted']} mapped "
        f"(+{report['keys_tied_aliases']} tied aliases checked equal)\n"
        f"  stack N={stack['num_stack_layers']} adapter depth={stack['adapter_depth']} "
        f"codebook {stack['codebook_size']} x {stack['codebook_dim']}\n"
        f"  stacked_ar: {stacked['matched']}/{stacked['expected']} keys"
        f" | pixel_encoder: {report['coverage']['pixel_encoder']['matched']} keys"
        f" | diffusion_decoder: {report['diffusion_decoder']['keys']} keys "
        f"({report['diffusion_decoder']['parameters']:,} parameters, "
        f"{'loaded strictly' if report['diffusion_decoder']['loaded_strictly'] else 'kept aside'})\n"
        f"  wrote {out_dir}"
    )
    return 0
