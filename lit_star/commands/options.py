"""Option groups shared by the sampling and evaluation jobs: where a stage 2 model comes from, and how it runs.

A job takes ``ckpt`` plus ``model: ModelOverrides`` (``--model.image_size 64``), a
:class:`~lit_star.sampling.filtering.SamplerConfig` (``--sampler.cfg_scale 4 --sampler.top_k 16``) and
:class:`~lit_star.sampling.decoding.DecodeOptions` (``--decode.static_cache true``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_star.sampling.loading import load_star
from lit_star.sampling.modes import Star


@dataclass
class ModelOverrides:
    """Overrides of what a stage 2 checkpoint records, and where it runs.

    Args:
        base: Qwen2.5-VL directory overriding the recorded one (its checksum must still match).
        vq: VQ checkpoint overriding the recorded or bundled one.
        vq_flavour: VQ flavour of a reference-layout VQ-Model.pt given with ``vq``.
        image_size: generated image side (default: recorded in the checkpoint).
        device: ``cpu``, ``cuda``, ... (default: cuda when available).
        stack_dtype: dtype of stack, adapter and head at inference (default: as stored, float32).
        threads: CPU threads (``torch.set_num_threads``).
    """

    base: str | None = None
    vq: str | None = None
    vq_flavour: str | None = None
    image_size: int | None = None
    device: str | None = None
    stack_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    threads: int = 1


def load_model(ckpt: str, model: ModelOverrides) -> Star:
    """The stage 2 model of ``ckpt`` with ``model``'s overrides applied."""
    torch.set_num_threads(model.threads)
    device = model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_star(
        ckpt, base=model.base, vq=model.vq, vq_flavour=model.vq_flavour, image_size=model.image_size,
        device=device, stack_dtype=getattr(torch, model.stack_dtype) if model.stack_dtype else None,
    )
