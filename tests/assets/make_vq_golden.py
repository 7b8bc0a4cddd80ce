"""Regenerate the VQ golden files from a checkout of the reference implementation (MM-MVR/STAR).

    git clone https://github.com/MM-MVR/STAR /tmp/STAR
    python tests/assets/make_vq_golden.py --star-repo /tmp/STAR

Writes ``vq_reference_tiny.safetensors`` (seeded tiny weights, inputs and the reference's codes, pixels
and codebook vectors for 1/2 heads x plain/l2-normalised codes) and ``vq_reference_keys.json`` (the
reference's key set and shapes for the released flavours) next to this script. Nothing from the
reference is stored here; its module is imported at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
TINY = dict(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1],
            z_channels=32, ch=32, num_res_blocks=1)
RELEASED = {
    "star-vq": dict(encoder_ch_mult=[1, 2, 2, 4, 8], decoder_ch_mult=[1, 2, 2, 4, 8], codebook_size=65536,
                    codebook_embed_dim=512, z_channels=512, ch=256, attn_num_heads=8),
    "vqgan-16384x8": dict(),  # the reference's ModelArgs defaults are LlamaGen's VQ-16
}


def import_reference(star_repo: Path) -> types.ModuleType:
    # The reference imports deepspeed only for a logger; a stand-in keeps deepspeed out of this environment.
    shim = types.ModuleType("deepspeed.utils")
    shim.logger = logging.getLogger("reference")
    sys.modules.setdefault("deepspeed", types.ModuleType("deepspeed"))
    sys.modules.setdefault("deepspeed.utils", shim)
    path = star_repo / "star" / "models" / "pixel_encoder" / "vq_model.py"
    spec = importlib.util.spec_from_file_location("reference_vq_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded_state(ref: types.ModuleType, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Reference-initialised weights with randomised norms/biases and a codebook at the encoder's scale,
    rounded to bf16-representable values so that the asset can be stored in bf16."""
    torch.manual_seed(1234)
    model = ref.VQModel(ref.ModelArgs(**TINY, attn_num_heads=2))
    state = model.state_dict()
    for key, value in state.items():
        if key == "quantize.codebook_used":
            continue
        if "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        elif key.endswith("bias"):
            state[key] = 0.05 * torch.randn(value.shape, generator=gen)
        elif key == "quantize.embedding.weight":
            state[key] = torch.randn(value.shape, generator=gen)
    state = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        scale = model.quant_conv(model.encoder(images)).std()
    state["quantize.embedding.weight"] = (state["quantize.embedding.weight"] * scale).to(torch.bfloat16).float()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--star-repo", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = import_reference(args.star_repo)

    gen = torch.Generator().manual_seed(99)
    images = (torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1).to(torch.bfloat16).float()
    state = seeded_state(ref, images, gen)
    tensors = {f"weights.{k}": v.to(torch.bfloat16) for k, v in state.items()}
    tensors["images"] = images.to(torch.bfloat16)
    for heads in (1, 2):
        for l2_norm in (False, True):
            model = ref.VQModel(ref.ModelArgs(**TINY, attn_num_heads=heads, codebook_l2_norm=l2_norm))
            model.load_state_dict(state, strict=True)
            model.eval()
            with torch.no_grad():
                quant, _, (_, _, indices) = model.encode(images)
                tag = f"heads{heads}_l2{int(l2_norm)}"
                tensors[f"{tag}.codes"] = indices.view(2, 8, 8).long()
                tensors[f"{tag}.reconstruction"] = model.decode(quant).contiguous()
                tensors[f"{tag}.decoded"] = model.decode_code(indices.view(2, -1), shape=[2, 8, 8, 8]).contiguous()
                tensors[f"{tag}.vectors"] = model.get_codebook_entry(indices.view(2, -1)).contiguous()
    save_file(tensors, str(HERE / "vq_reference_tiny.safetensors"),
              metadata={"config": json.dumps(TINY), "source": "MM-MVR/STAR star/models/pixel_encoder/vq_model.py"})

    keys = {}
    for name, overrides in RELEASED.items():
        with torch.device("meta"):
            model = ref.VQModel(ref.ModelArgs(**overrides))
        keys[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    (HERE / "vq_reference_keys.json").write_text(json.dumps(keys, indent=0, sort_keys=True))


if __name__ == "__main__":
    main()
