"""Named STAR stack flavours and the Qwen2.5-VL architectures they sit on.

``STACK_FLAVOURS`` holds the paper's released configurations (MM-MVR/STAR ``configs/STAR_Qwen2.5-VL-*.json``).
``qwen2_5_vl_config`` rebuilds the public Qwen2.5-VL-3B/7B-Instruct architectures without weights, for
meta-device construction (parameter counts, sharding plans); real runs load the base from a local directory.
"""

from __future__ import annotations

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
}

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
