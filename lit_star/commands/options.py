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


@dataclass
class PixelDecoder:
    """Which decoder turns image codes into pixels.

    Args:
        kind: ``vq`` (the VQ's decoder) or ``diffusion`` (the stage 3 diffusion decoder).
        ckpt: stage 3 checkpoint (DiffusionDecoderModule .ckpt or save_decoder directory) or stage 4 .ckpt (its
            decoder), with ``diffusion``.
        size: diffusion output side (default: the stage 2 image size); any multiple of the DiT patch.
        steps: Euler steps (default 40 for text-to-image, 50 for editing, the reference's).
        guidance: text guidance g (default 4.5, editing 3.0).
        image_guidance: image guidance ig (default 1.05, editing 1.8).
    """

    kind: Literal["vq", "diffusion"] = "vq"
    ckpt: str | None = None
    size: int | None = None
    steps: int | None = None
    guidance: float | None = None
    image_guidance: float | None = None


@dataclass
class LoadedDiffusionDecoder:
    """A stage 3 decoder ready to sample: the model, its scheduler, the guidance settings and the output size."""

    decoder: object
    scheduler: object
    settings: object
    size: int
    ckpt: str

    def record(self) -> dict:
        """What generations.jsonl records about it."""
        return {"decoder_ckpt": self.ckpt, "decoder_size": self.size, "decoder_settings": self.settings.as_dict()}


# The reference's defaults: (steps, guidance, image guidance) for text-to-image and for editing.
DIFFUSION_DEFAULTS = {False: (40, 4.5, 1.05), True: (50, 3.0, 1.8)}


def load_pixel_decoder(decoder: PixelDecoder, star: Star, model: ModelOverrides, edit: bool) -> LoadedDiffusionDecoder | None:
    """The stage 3 decoder ``decoder`` names, or None for the VQ decoder; errors name the missing option."""
    if decoder.kind == "vq":
        return None
    if not decoder.ckpt:
        raise ValueError("--decoder.kind diffusion needs --decoder.ckpt")
    from lit_star.checkpoints import load_stage3
    from lit_star.sampling.diffusion import GuidanceSettings

    steps, guidance, image_guidance = DIFFUSION_DEFAULTS[edit]
    stage3 = load_stage3(decoder.ckpt, vq=model.vq, vq_flavour=model.vq_flavour)
    stage3.decoder.to(model.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pick = lambda given, default: default if given is None else given  # noqa: E731
    settings = GuidanceSettings(pick(decoder.steps, steps), pick(decoder.guidance, guidance),
                                pick(decoder.image_guidance, image_guidance))
    return LoadedDiffusionDecoder(stage3.decoder, stage3.scheduler, settings, decoder.size or star.image_size,
                                  str(decoder.ckpt))
