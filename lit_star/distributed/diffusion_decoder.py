"""Stage 3's parallelism plan: activation checkpointing of every DiT block, then FSDP2 (every block, then the
denoiser as the root, since every forward of the decoder goes through it)."""

from __future__ import annotations

from lit_star.distributed.plans import enable_activation_checkpointing, fully_shard_units
from lit_star.models.diffusion_decoder import DiffusionDecoder


def parallelize_diffusion_decoder(decoder: DiffusionDecoder, activation_checkpointing: bool = False, mesh=None) -> int:
    """Apply the plan to ``decoder``'s DiT; ``mesh``: the data-parallel device mesh, or None for one process.
    Returns how many DiT blocks were sharded (0 without a mesh)."""
    dit = decoder.transformer
    blocks = [*dit.context_refiner, *dit.noise_refiner, *dit.layers]
    if activation_checkpointing:
        enable_activation_checkpointing(blocks)
    if mesh is None:
        return 0
    return fully_shard_units(decoder.denoiser, blocks, mesh)
