"""Stage 4's parallelism plan: stage 2's plan on the stacked AR and stage 3's on the diffusion decoder.

The two models are separate FSDP2 roots (stage 2's ``TextToImageObjective`` and stage 3's denoiser): stage 4 calls
each forward on its own, and FSDP2 runs its lazy initialisation and gathers in the forward of a root, which a
common parent that is never called would not have.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lit_star.distributed.diffusion_decoder import parallelize_diffusion_decoder
from lit_star.distributed.stacked_ar import parallelize_stacked_ar
from lit_star.models.diffusion_decoder import DiffusionDecoder
from lit_star.models.stacked_ar import StackedAR


def parallelize_unified(
    stack_root: nn.Module,
    stacked_ar: StackedAR,
    decoder: DiffusionDecoder,
    stack_activation_checkpointing: Sequence[str] = (),
    compile_layers: bool = False,
    decoder_activation_checkpointing: bool = False,
    mesh=None,
) -> dict[str, int]:
    """Apply both plans; ``mesh``: the data-parallel device mesh, or None for one process. Returns the units
    sharded per model (roots excluded) and the decoder layers compiled."""
    counts = parallelize_stacked_ar(stack_root, stacked_ar, stack_activation_checkpointing, compile_layers, mesh)
    dit_blocks = parallelize_diffusion_decoder(decoder, decoder_activation_checkpointing, mesh)
    return {"stacked_ar": counts["sharded"], "compiled": counts["compiled"], "diffusion_decoder": dit_blocks}
