"""Import a released STAR checkpoint (MM-MVR/STAR layout) with exact key coverage.

    python -m lit_star import-reference --ckpt STAR-3B.pt --base checkpoints/Qwen2.5-VL-3B-Instruct --out runs/star3b

Writes into ``--out``:
  stacked_ar.safetensors + stacked_ar.json   stack, adapter and pixel head (load with
                                             ``lit_star.models.stacked_ar.load_stacked_ar``)
  vq/                                        the ``pixel_encoder.*`` VQ (``VQModel.from_pretrained``)
  diffusion_decoder.safetensors              ``diffusion_decoder.*`` as stored (prefix stripped)
  import_report.json                         key coverage per group

The checkpoint's ``llm.*`` must equal the weights in ``--base`` (STAR keeps its base frozen); any
difference, any missing or unexpected key, or any shape mismatch is an error that names the keys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lit_star.models.base_vlm import load_base_vlm
from lit_star.models.reference_format import (
    KeyMismatchError,
    base_differences,
    infer_stack_shape,
    load_reference_into,
    split_reference_state_dict,
    stacked_ar_coverage,
)
from lit_star.models.stacked_ar import StackedAR, save_stacked_ar
from lit_star.models.vq import VQModel, vq_config

DIFFUSION_DECODER_WEIGHTS = "diffusion_decoder.safetensors"
REPORT_FILE = "import_report.json"


def read_reference_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path)['state_dict']``, memory-mapped so a 7B checkpoint is not read into RAM at once."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        keys = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise KeyMismatchError(f"{path}: expected a dict with a 'state_dict' entry (reference layout), got {keys}")
    state = payload["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise KeyMismatchError(f"{path}: non-tensor entries in state_dict: {bad[:20]}")
    return state


def import_reference(ckpt: Path, base_dir: Path, out: Path, vq_flavour: str) -> dict:
    """Map ``ckpt`` onto our modules, write them to ``out`` and return the coverage report."""
    state = read_reference_checkpoint(ckpt)
    shape = infer_stack_shape(state)
    parts = split_reference_state_dict(state)
    llm_dtypes = {v.dtype for k, v in parts.stacked_ar.items() if k.startswith("base.")}
    if len(llm_dtypes) > 1:
        raise ValueError(f"{ckpt}: llm.* tensors mix dtypes {sorted(map(str, llm_dtypes))}")
    base = load_base_vlm(base_dir, dtype=llm_dtypes.pop() if llm_dtypes else torch.float32)
    model = StackedAR(
        base,
        num_stack_layers=shape.num_stack_layers,
        adapter_depth=shape.adapter_depth,
        codebook_size=shape.codebook_size,
        codebook_dim=shape.codebook_dim,
    )
    stacked_ar_coverage(model, parts.stacked_ar).raise_if_incomplete()
    differing = base_differences(model, parts.stacked_ar)
    if differing:
        raise ValueError(
            f"{ckpt}: {len(differing)} llm.* tensors differ from the base in {base_dir} "
            f"(first: {differing[:5]}); pass the Qwen2.5-VL directory the checkpoint was trained on"
        )
    coverage = {"stacked_ar": load_reference_into(model, parts.stacked_ar).as_dict()}
    report: dict = {
        "checkpoint": str(ckpt),
        "base": str(base_dir),
        "stack": vars(shape),
        "keys_in_checkpoint": len(state),
        "coverage": coverage,
    }
    save_stacked_ar(model, out, base_dir)

    if parts.vq:
        vq = VQModel(vq_config(vq_flavour, codebook_projector=False))
        vq.load_reference_state_dict(parts.vq, source=f"{ckpt} pixel_encoder.*")
        if (vq.config.codebook_size, vq.config.codebook_embed_dim) != (shape.codebook_size, shape.codebook_dim):
            raise ValueError(
                f"VQ codebook {vq.config.codebook_size} x {vq.config.codebook_embed_dim} does not match the "
                f"pixel head/adapter ({shape.codebook_size} x {shape.codebook_dim})"
            )
        vq.save_pretrained(out / "vq")
        # load_reference_state_dict above is strict, so every key matched
        coverage["pixel_encoder"] = {"expected": len(vq.state_dict()), "matched": len(parts.vq)}
    else:
        coverage["pixel_encoder"] = {"expected": None, "matched": 0, "note": "no pixel_encoder.* keys in checkpoint"}

    if parts.diffusion_decoder:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in parts.diffusion_decoder.items()}, str(out / DIFFUSION_DECODER_WEIGHTS))
    report["diffusion_decoder"] = {
        "keys": len(parts.diffusion_decoder),
        "parameters": sum(v.numel() for v in parts.diffusion_decoder.values()),
        "file": DIFFUSION_DECODER_WEIGHTS if parts.diffusion_decoder else None,
    }
    accounted = coverage["stacked_ar"]["matched"] + len(parts.vq) + len(parts.diffusion_decoder)
    report["keys_accounted"] = accounted
    report["keys_tied_aliases"] = len(state) - accounted
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_star import-reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="released STAR checkpoint (STAR-3B.pt / STAR-7B.pt)")
    parser.add_argument("--base", type=Path, required=True, help="local Qwen2.5-VL Hugging Face directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--vq-config", default="star-vq", help="VQ flavour of pixel_encoder.* (lit_star.models.vq)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = import_reference(args.ckpt, args.base, args.out, args.vq_config)
    stack, stacked = report["stack"], report["coverage"]["stacked_ar"]
    print(
        f"imported {args.ckpt}: {report['keys_in_checkpoint']} keys, {report['keys_accounted']} mapped "
        f"(+{report['keys_tied_aliases']} tied aliases checked equal)\n"
        f"  stack N={stack['num_stack_layers']} adapter depth={stack['adapter_depth']} "
        f"codebook {stack['codebook_size']} x {stack['codebook_dim']}\n"
        f"  stacked_ar: {stacked['matched']}/{stacked['expected']} keys"
        f" | pixel_encoder: {report['coverage']['pixel_encoder']['matched']} keys"
        f" | diffusion_decoder: {report['diffusion_decoder']['keys']} keys "
        f"({report['diffusion_decoder']['parameters']:,} parameters, kept aside)\n"
        f"  wrote {args.out}"
    )
    return 0
