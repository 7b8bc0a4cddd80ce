"""Released-checkpoint layout: key mapping, export -> import-reference round trip, strict key coverage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from transformers import Qwen2_5_VLForConditionalGeneration

from lit_star.cli import main as cli
from lit_star.models.base_vlm import build_tiny_base_vlm, tiny_config
from lit_star.models.reference_format import (
    export_reference_state_dict,
    infer_stack_shape,
    our_key_to_reference,
    reference_key_to_ours,
)
from lit_star.models.sequence_layout import SequenceLayout, collate_padded
from lit_star.models.stacked_ar import StackedAR, load_stacked_ar
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.models.vq import VQModel, vq_config

CORPUS = ["a red circle above a blue square", "two green triangles", "make the circle blue"] * 20
VQ_FLAVOUR = "tiny"
DIFFUSION_KEYS = {"transformer.x_embedder.weight": (8, 24), "transformer.norm_out.linear.bias": (8,)}


@pytest.fixture(scope="module")
def tokenizer():
    return train_qwen2_tokenizer(CORPUS, vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(3)
    return VQModel(vq_config(VQ_FLAVOUR, codebook_projector=False)).eval()


def build_model(tokenizer, vq, tie_word_embeddings: bool = False) -> StackedAR:
    torch.manual_seed(0)
    config = tiny_config(tokenizer, "micro")
    config.tie_word_embeddings = tie_word_embeddings
    base = Qwen2_5_VLForConditionalGeneration(config)
    torch.manual_seed(1)
    model = StackedAR(base, num_stack_layers=2, adapter_depth=3, codebook_size=vq.config.codebook_size,
                      codebook_dim=vq.config.codebook_embed_dim)
    with torch.no_grad():  # make every trainable tensor distinct from its initialisation
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    return model.eval()


def write_reference(tmp_path, model, vq, state=None):
    """Base directory + released-layout checkpoint for ``model``; returns (ckpt, base_dir)."""
    base_dir = tmp_path / "qwen"
    model.base.save_pretrained(base_dir)
    if state is None:
        diffusion = {k: torch.randn(shape) for k, shape in DIFFUSION_KEYS.items()}
        state = export_reference_state_dict(model, vq.reference_state_dict(), diffusion)
    ckpt = tmp_path / "STAR-tiny.pt"
    torch.save({"state_dict": state}, ckpt)
    return ckpt, base_dir


def run_import(tmp_path, ckpt, base_dir) -> int:
    return cli(["import-reference", "--ckpt", str(ckpt), "--base", str(base_dir), "--out", str(tmp_path / "out"),
                                  "--vq_config", VQ_FLAVOUR])


def forward(model: StackedAR, vq: VQModel, tokenizer) -> torch.Tensor:
    layout = SequenceLayout(tokenizer, model.base.config)
    codes = torch.randint(0, vq.config.codebook_size, (16,), generator=torch.Generator().manual_seed(0))
    batch = collate_padded([layout.text_to_image("a red circle", codes)], layout.special.pad)
    with torch.no_grad():
        embeds = model.embed_inputs(batch.input_ids, batch.code_mask, vq.codebook_vectors(batch.code_ids))
        return model.logits(model(embeds, batch.position_ids, batch.attention_mask))


def test_key_mapping_follows_transformers_5_renames():
    pairs = {
        "llm.model.layers.3.self_attn.q_proj.weight": "base.model.language_model.layers.3.self_attn.q_proj.weight",
        "llm.model.embed_tokens.weight": "base.model.language_model.embed_tokens.weight",
        "llm.model.norm.weight": "base.model.language_model.norm.weight",
        "llm.visual.blocks.0.attn.qkv.weight": "base.model.visual.blocks.0.attn.qkv.weight",
        "llm.visual.merger.mlp.0.weight": "base.model.visual.merger.mlp.0.weight",
        "llm.lm_head.weight": "base.lm_head.weight",
        "stacked_ar.model.layers.15.mlp.down_proj.weight": "stack.layers.15.mlp.down_proj.weight",
        "stacked_ar.model.norm.weight": "stack.norm.weight",
        "pixel_adapter.layers.6.bias": "adapter.layers.6.bias",
        "pixel_output_head.weight": "pixel_head.weight",
    }
    for reference, ours in pairs.items():
        assert reference_key_to_ours(reference) == ours
        assert our_key_to_reference(ours) == reference
    assert reference_key_to_ours("pixel_encoder.quantize.embedding.weight") is None


def test_export_import_round_trip_gives_identical_forward(tmp_path, tokenizer, vq, capsys):
    model = build_model(tokenizer, vq)
    ckpt, base_dir = write_reference(tmp_path, model, vq)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"llm", "stacked_ar", "pixel_adapter", "pixel_output_head",
                                                 "pixel_encoder", "diffusion_decoder"}
    assert sorted(k for k in state if k.startswith("pixel_adapter.") and k.endswith("weight")) == [
        "pixel_adapter.layers.0.weight", "pixel_adapter.layers.2.weight", "pixel_adapter.layers.4.weight"]
    shape = infer_stack_shape(state)
    assert (shape.num_stack_layers, shape.adapter_depth) == (2, 3)

    assert run_import(tmp_path, ckpt, base_dir) == 0
    out = tmp_path / "out"
    report = json.loads((out / "import_report.json").read_text())
    coverage = report["coverage"]["stacked_ar"]
    assert coverage["matched"] == coverage["expected"] == len(model.state_dict())
    assert coverage["missing"] == coverage["unexpected"] == coverage["mis_shaped"] == []
    assert report["keys_accounted"] == report["keys_in_checkpoint"] == len(state)
    assert report["diffusion_decoder"]["keys"] == len(DIFFUSION_KEYS)
    assert "stacked_ar: " in capsys.readouterr().out

    imported = load_stacked_ar(out).eval()
    imported_vq = VQModel.from_pretrained(out / "vq").eval()
    assert torch.equal(forward(model, vq, tokenizer), forward(imported, imported_vq, tokenizer))
    for key, value in vq.reference_state_dict().items():
        assert torch.equal(imported_vq.state_dict()[key].to(value.dtype), value), key
    diffusion = load_file(str(out / "diffusion_decoder.safetensors"))
    assert {k: tuple(v.shape) for k, v in diffusion.items()} == DIFFUSION_KEYS
    # and back again: the reverse export of the import is the same checkpoint (model part)
    again = export_reference_state_dict(imported)
    for key, value in again.items():
        assert torch.equal(value, state[key]), key


def test_tied_lm_head_may_be_absent_or_present(tmp_path, tokenizer, vq):
    model = build_model(tokenizer, vq, tie_word_embeddings=True)
    assert model.base.lm_head.weight is model.base.model.language_model.embed_tokens.weight
    state = export_reference_state_dict(model, vq.reference_state_dict())
    assert "llm.lm_head.weight" in state  # the reference saved tied weights under both names
    del state["llm.lm_head.weight"]
    ckpt, base_dir = write_reference(tmp_path, model, vq, state)
    assert run_import(tmp_path, ckpt, base_dir) == 0


@pytest.mark.parametrize(
    "drop, add, message",
    [
        ("stacked_ar.model.layers.1.mlp.up_proj.weight", None, "missing.*stacked_ar.model.layers.1.mlp.up_proj.weight"),
        ("pixel_output_head.bias", None, "missing.*pixel_output_head.bias"),
        ("pixel_encoder.quant_conv.bias", None, "missing.*quant_conv.bias"),
        (None, ("stacked_ar.model.layers.0.extra.weight", 1), "unexpected.*stacked_ar.model.layers.0.extra.weight"),
        (None, ("llm.visual.blocks.9.norm1.weight", 1), "unexpected.*llm.visual.blocks.9.norm1.weight"),
        (None, ("text_encoder.weight", 1), "outside the reference layout.*text_encoder.weight"),
        (None, ("stacked_ar.model.norm.weight", 3), "shape mismatch.*stacked_ar.model.norm.weight"),
    ],
)
def test_import_fails_naming_bad_keys(tmp_path, tokenizer, vq, drop, add, message):
    model = build_model(tokenizer, vq)
    state = export_reference_state_dict(model, vq.reference_state_dict())
    if drop is not None:
        del state[drop]
    if add is not None:
        state[add[0]] = torch.zeros(add[1])
    ckpt, base_dir = write_reference(tmp_path, model, vq, state)
    with pytest.raises(KeyError, match=f"(?s){message}"):
        run_import(tmp_path, ckpt, base_dir)


def test_import_refuses_a_different_base(tmp_path, tokenizer, vq):
    model = build_model(tokenizer, vq)
    ckpt, _ = write_reference(tmp_path, model, vq)
    other = tmp_path / "other_qwen"
    build_tiny_base_vlm(tokenizer, "micro").save_pretrained(other)
    with pytest.raises(ValueError, match=r"llm\.\* tensors differ from the base.*llm\.model\.embed_tokens\.weight"):
        run_import(tmp_path, ckpt, other)
