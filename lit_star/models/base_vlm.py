"""The base vision-language model STAR builds on: Qwen2.5-VL through transformers.

One code path serves every size. A released Qwen2.5-VL-3B/7B directory and the tiny Shapes base
exported by stage 0 are both plain Hugging Face directories, loaded with
``Qwen2_5_VLForConditionalGeneration.from_pretrained(dir, dtype=...)``. The ``tiny`` flavour builds
a small Qwen2.5-VL (vision tower included) from a config, for tests and the CPU world.

The accessors at the bottom (:func:`decoder_layers`, :func:`final_norm`, ...) name the submodules
that STAR touches in the transformers 5 layout, so no other module spells out attribute paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lit_star.models.tokenizer import special_token_ids


@dataclass(frozen=True)
class TinyBaseSpec:
    """Sizes of a small Qwen2.5-VL.

    Vision geometry: each merged vision token covers ``patch_size * spatial_merge_size`` pixels per
    side. Qwen's 14 px patches would turn a 64 px Shapes image into 2x2 tokens (and the processor
    would resize it to 56 px); 8 px patches with 2x2 merging give a 4x4 grid of 16 tokens at the
    world's native 64 px, one token per 16 px cell.
    """

    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    vision_hidden_size: int = 96
    vision_intermediate_size: int = 256
    vision_depth: int = 2
    vision_num_heads: int = 4
    patch_size: int = 8
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Pixels per window side for windowed attention; 32 px = 2x2 merged tokens per window.
    window_size: int = 32
    image_size: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """Split of the rotary half-dimension over (t, h, w); Qwen uses [16, 24, 24] for head_dim 128."""
        half = self.head_dim // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


TINY_FLAVOURS: dict[str, TinyBaseSpec] = {
    # The Shapes world base: ~2M parameters, trains to its targets in minutes on one CPU core.
    "tiny": TinyBaseSpec(),
    # For unit tests: builds and runs a forward pass in milliseconds.
    "micro": TinyBaseSpec(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_depth=2,
        vision_num_heads=2,
    ),
}


def tiny_spec(flavour: str | TinyBaseSpec) -> TinyBaseSpec:
    if isinstance(flavour, TinyBaseSpec):
        return flavour
    if flavour not in TINY_FLAVOURS:
        raise KeyError(f"unknown tiny base flavour {flavour!r}; choose from {sorted(TINY_FLAVOURS)}")
    return TINY_FLAVOURS[flavour]


def tiny_config(tokenizer, flavour: str | TinyBaseSpec = "tiny") -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given flavour whose token ids match ``tokenizer``."""
    spec = tiny_spec(flavour)
    if spec.hidden_size % spec.num_attention_heads or spec.head_dim % 2:
        raise ValueError(f"hidden_size {spec.hidden_size} must split into an even head_dim over {spec.num_attention_heads} heads")
    ids = special_token_ids(tokenizer)
    # Round the embedding table up like Qwen does (151936 rows for 151665 tokens).
    vocab_size = -(-len(tokenizer) // 64) * 64
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": spec.mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "window_size": spec.window_size,
        # Qwen alternates windowed blocks with a full-attention block every 8; here the last block is full.
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_base_vlm(tokenizer, flavour: str | TinyBaseSpec = "tiny") -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised tiny Qwen2.5-VL (fp32) sized for ``tokenizer``."""
    return Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, flavour))


def load_base_vlm(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> Qwen2_5_VLForConditionalGeneration:
    """Load any Qwen2.5-VL Hugging Face directory (3B, 7B, or a stage 0 export) from local disk."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Processor


def build_image_processor(flavour: str | TinyBaseSpec = "tiny") -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image preprocessing (resize to a multiple of the merged patch, CLIP normalisation, patchify).

    ``min_pixels`` is one image of the world's native size, so a ``image_size`` px image is not upscaled,
    and ``max_pixels`` caps inputs at a 4x larger side.
    """
    spec = tiny_spec(flavour)
    factor = spec.patch_size * spec.spatial_merge_size
    if spec.image_size % factor:
        raise ValueError(f"image_size {spec.image_size} must be a multiple of patch_size * spatial_merge_size = {factor}")
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        min_pixels=spec.image_size * spec.image_size,
        max_pixels=16 * spec.image_size * spec.image_size,
    )


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only.

    The stock processor also builds a video processor, which needs torchvision (not installable beside
    CPU torch here). Declaring only ``image_processor`` and ``tokenizer`` in ``__init__`` makes
    ``ProcessorMixin`` manage just those two; image tokenisation, ``image_grid_thw`` and
    ``mm_token_type_ids`` (which M-RoPE needs) behave exactly as in the stock processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_processor(path: str | os.PathLike) -> Qwen2_5_VLImageTextProcessor:
    """Processor of a Qwen2.5-VL directory (``tokenizer*`` + ``preprocessor_config.json``), without torchvision."""
    path = Path(path)
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path} has no preprocessor_config.json (Qwen2-VL image processor settings)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return Qwen2_5_VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_base_vlm(model: Qwen2_5_VLForConditionalGeneration, processor: Qwen2_5_VLImageTextProcessor, out_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face directory laid out like a released Qwen2.5-VL one.

    ``config.json`` + ``model.safetensors`` + ``generation_config.json``, the tokenizer files with the
    chat template, and ``preprocessor_config.json`` for the image processor.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Named submodules (transformers 5 layout: model.model.language_model / model.model.visual / lm_head)


def language_model(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    """The text decoder (``Qwen2_5_VLTextModel``): embeddings, layers, norm, rotary embedding."""
    return model.model.language_model


def decoder_layers(model: Qwen2_5_VLForConditionalGeneration) -> nn.ModuleList:
    return model.model.language_model.layers


def final_norm(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    return model.model.language_model.norm


def embed_tokens(model: Qwen2_5_VLForConditionalGeneration) -> nn.Embedding:
    return model.model.language_model.embed_tokens


def rotary_embedding(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    """Call as ``rotary_embedding(model)(hidden, position_ids)`` -> ``(cos, sin)`` with M-RoPE sections merged."""
    return model.model.language_model.rotary_emb


def vision_tower(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    return model.model.visual


def lm_head(model: Qwen2_5_VLForConditionalGeneration) -> nn.Linear:
    return model.lm_head


def text_config(model: Qwen2_5_VLForConditionalGeneration):
    return model.config.text_config
