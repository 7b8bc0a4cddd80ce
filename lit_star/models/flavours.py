"""Named STAR stack flavours and the Qwen2.5-VL architectures they sit on: one registry for recipes, benches
and tests (``flavour: star-3b`` in a stage 2 recipe, plus overrides).

``STACK_FLAVOURS`` holds the paper's released configurations (MM-MVR/STAR ``configs/STAR_Qwen2.5-VL-*.json``),
the Shapes world's stack and the benchmark sizes. ``base_architecture`` names a public Qwen2.5-VL
(:data:`QWEN2_5_VL_ARCHITECTURES`) or a tiny base (``lit_star.models.base_vlm.TINY_FLAVOURS``).
``qwen2_5_vl_config`` rebuilds the public Qwen2.5-VL-3B/7B-Instruct architectures without weights, for
meta-device construction (parameter counts, sharding plans); real runs load the base from a local directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import Qwen2_5_VLConfig


@dataclass(frozen=True)
class StackFlavour:
    num_stack_layers: int
    adapter_depth: int
    codebook_size: int = 65536
    codebook_dim: int = 512
    base_architecture: str = ""


STACK_FLAVOURS: dict[str, StackFlavour] = {
    "star-3b": StackFlavour(num_stack_layers=16, adapter_depth=2, base_architecture="qwen2.5-vl-3b"),
    "star-7b": StackFlavour(num_stack_layers=14, adapter_depth=4, base_architecture="qwen2.5-vl-7b"),
    # The Shapes curriculum's stack: copies of all 4 layers of the tiny base, the tiny VQ's 1,024 x 16 codes.
    "shapes": StackFlavour(num_stack_layers=4, adapter_depth=2, codebook_size=1024, codebook_dim=16,
                           base_architecture="tiny"),
    # Benchmark sizes: a 2-layer stack on the tiny base; ~60M parameters with a 16,384 x 8 codebook (LlamaGen VQ-16).
    "tiny": StackFlavour(num_stack_layers=2, adapter_depth=2, codebook_size=1024, codebook_dim=16,
                         base_architecture="tiny"),
    "mid": StackFlavour(num_stack_layers=4, adapter_depth=2, codebook_size=16384, codebook_dim=8,
                        base_architecture="mid"),
}


def stack_flavour(name: str, **overrides) -> StackFlavour:
    """The registered flavour ``name`` with ``overrides`` (fields of :class:`StackFlavour`) applied."""
    if name not in STACK_FLAVOURS:
        raise KeyError(f"unknown stack flavour {name!r}; choose from {sorted(STACK_FLAVOURS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(StackFlavour)})
    if unknown:
        raise KeyError(f"stack flavour {name!r}: unknown fields {unknown}")
    return dataclasses.replace(STACK_FLAVOURS[name], **overrides)

_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
_TEXT = dict(
    vocab_size=151936,
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_ARCHITECTURES: dict[str, dict] = {
    "qwen2.5-vl-3b": dict(
        text=dict(_TEXT, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2),
        vision=dict(_VISION, out_hidden_size=2048),
        tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": dict(
        text=dict(_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4),
        vision=dict(_VISION, out_hidden_size=3584),
        tie_word_embeddings=False,
    ),
}


def qwen2_5_vl_config(name: str) -> Qwen2_5_VLConfig:
    """Config of a public Qwen2.5-VL architecture (``qwen2.5-vl-3b`` or ``qwen2.5-vl-7b``)."""
    if name not in QWEN2_5_VL_ARCHITECTURES:
        raise KeyError(f"unknown Qwen2.5-VL architecture {name!r}; choose from {sorted(QWEN2_5_VL_ARCHITECTURES)}")
    spec = QWEN2_5_VL_ARCHITECTURES[name]
    return Qwen2_5_VLConfig(
        text_config=dict(spec["text"]),
        vision_config=dict(spec["vision"]),
        tie_word_embeddings=spec["tie_word_embeddings"],
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
