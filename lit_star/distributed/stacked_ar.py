"""Stage 2's parallelism plan (torchtitan's per-model ``parallelize``): what is recomputed, compiled and sharded.

Order: activation checkpointing, then ``torch.compile``, then FSDP2 (every decoder layer of base and stack, the
base's towers and embeddings, the trainable heads, then the root).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lit_star.distributed.plans import compile_modules, enable_activation_checkpointing, fully_shard_units
from lit_star.models.base_vlm import decoder_layers, embed_tokens, language_model, lm_head, vision_tower
from lit_star.models.stacked_ar import StackedAR


def parallelize_stacked_ar(
    root: nn.Module,
    stacked_ar: StackedAR,
    activation_checkpointing: Sequence[str] = (),
    compile_layers: bool = False,
    mesh=None,
) -> dict[str, int]:
    """Apply the plan to ``stacked_ar`` (inside ``root``, the module FSDP2 wraps last); ``mesh``: the data-parallel
    device mesh, or None for one process. Returns how many layers were compiled and units sharded."""
    checkpointed = []
    if "base" in activation_checkpointing:
        checkpointed += list(decoder_layers(stacked_ar.base))
    if "stack" in activation_checkpointing:
        checkpointed += list(stacked_ar.stack.layers)
    if checkpointed:
        enable_activation_checkpointing(checkpointed)
    counts = {"compiled": 0, "sharded": 0}
    if compile_layers:
        counts["compiled"] = compile_modules([*decoder_layers(stacked_ar.base), *stacked_ar.stack.layers])
    if mesh is None:
        return counts
    base = stacked_ar.base
    units = [
        *decoder_layers(base),
        *stacked_ar.stack.layers,
        vision_tower(base),
        embed_tokens(base),
        language_model(base),
        base.model,
        lm_head(base),
        stacked_ar.stack,
        stacked_ar.adapter,
        stacked_ar.pixel_head,
    ]
    counts["sharded"] = fully_shard_units(root, units, mesh)
    return counts
