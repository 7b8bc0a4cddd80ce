"""The four ways to use a trained STAR: text-to-image, editing, understanding, implicit reasoning.

Everything takes a :class:`Star` (the stacked AR, its VQ, the base's processor and the sequence layout) and
is a plain function, so a Lightning callback, the CLI and the eval all call the same code.

- :func:`generate_codes`: text-to-image, a batch of prompts, one seed per sample.
- :func:`edit_codes`: the source image enters as VQ codes and ViT features in the reference's layout
  (``lit_star.models.sequence_layout``), with M-RoPE positions; guidance blanks the instruction only.
- :func:`answer_questions`: the frozen base answering, exactly as the base alone would.
- :func:`reason_then_generate`: the base first answers the prompt greedily; its answer (plus the
  reference's quality suffix) replaces the user text of the generation prompt, and comes back with the codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

# REFERENCE_REASONING_SUFFIX: what MM-MVR/STAR appends to the base's answer in reasoning mode (re-exported here;
# a stack records its own, Star.reasoning_suffix).
from lit_star.checkpoints import REFERENCE_REASONING_SUFFIX
from lit_star.data.images import to_rgb
from lit_star.models.base_vlm import Qwen2_5_VLImageTextProcessor, generate_answers
# SourceImage is re-exported: callers build edit prefixes from it.
from lit_star.models.edit_source import SourceImage, VitPixelLimits, encode_edit_source  # noqa: F401
from lit_star.models.sequence_layout import LayoutSample, SequenceLayout
from lit_star.models.stacked_ar import StackedAR
from lit_star.models.vq import VQModel
from lit_star.sampling.decoding import DecodeOptions, PrefixBatch, collate_prefixes, decode_image_codes
from lit_star.sampling.filtering import SamplerConfig, make_generators

# The base's answer budget in reasoning mode: MM-MVR/STAR lets it answer with up to 256 new tokens (NOTES section 2);
# the one default of every reasoning entry point (reason_then_generate, write_generations, generate --reasoning).
REFERENCE_MAX_ANSWER_TOKENS = 256


@dataclass
class Star:
    """A stage 2 model ready to sample: stacked AR + VQ + the base's processor + the sequence layout.

    ``image_size`` is the side of the images the stack was trained on (VQ input/output), which fixes the
    code grid: ``(image_size / downsample_factor) ** 2`` tokens per image. Understanding does not need it
    (``None``); generating and editing do.
    """

    model: StackedAR
    vq: VQModel
    processor: Qwen2_5_VLImageTextProcessor
    layout: SequenceLayout
    image_size: int | None
    # appended to the base's answer in reasoning mode when the caller gives none: the checkpoint's record
    reasoning_suffix: str = REFERENCE_REASONING_SUFFIX
    # ViT pixel limits of an edit's source; unset fields: the base's default (the reference's for a Qwen2.5-VL base,
    # lit_star.models.edit_source.default_vit_limits), as in training
    edit_vit_limits: VitPixelLimits = field(default_factory=VitPixelLimits)

    def __post_init__(self) -> None:
        factor = self.vq.config.downsample_factor
        if self.image_size is not None and self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VQ downsampling factor {factor}")
        vq_shape = (self.vq.config.codebook_size, self.vq.config.codebook_embed_dim)
        if vq_shape != (self.model.codebook_size, self.model.codebook_dim):
            raise ValueError(
                f"VQ codebook {vq_shape[0]} x {vq_shape[1]} does not match the stack's pixel head / adapter "
                f"({self.model.codebook_size} x {self.model.codebook_dim})"
            )

    @property
    def grid_size(self) -> int:
        if self.image_size is None:
            raise ValueError(
                "the image size the stack was trained at is unknown (not recorded in the checkpoint); "
                "pass image_size (--model.image_size)"
            )
        return self.image_size // self.vq.config.downsample_factor

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def device(self) -> torch.device:
        return self.model.stack.norm.weight.device

    def codebook(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.codebook_vectors(codes.to(self.vq.quantize.embedding.weight.device)).to(self.device)


def _prefix_sample(sample_builder: Callable[[torch.Tensor], LayoutSample]) -> LayoutSample:
    # A one-code target leaves no code inputs after the prompt, so the laid-out sample is exactly the
    # generation prefix, ending at <|vision_start|> (where the first code is predicted).
    return sample_builder(torch.zeros(1, dtype=torch.long))


def text_to_image_prefix(layout: SequenceLayout, prompts: Sequence[str], guided: bool) -> PrefixBatch:
    """Prefixes of ``prompts`` (plus the reference's unconditional rows when ``guided``)."""
    samples = [_prefix_sample(lambda t, p=p: layout.text_to_image(p, t)) for p in prompts]
    if guided:
        samples += [_prefix_sample(lambda t, p=p: layout.text_to_image(p, t, unconditional=True)) for p in prompts]
    return collate_prefixes(samples, len(prompts), layout.special.pad)


def _check_seeds(prompts: Sequence, seeds: Sequence[int] | None, sampler: SamplerConfig) -> None:
    if sampler.greedy:
        return
    if seeds is None or len(seeds) != len(prompts):
        raise ValueError(f"sampling needs one seed per sample: {len(prompts)} samples, {0 if seeds is None else len(seeds)} seeds")


def generate_codes(
    star: Star,
    prompts: Sequence[str],
    sampler: SamplerConfig,
    seeds: Sequence[int] | None = None,
    options: DecodeOptions = DecodeOptions(),
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Text-to-image codes, ``len(prompts) x grid x grid``; sample i is drawn with ``seeds[i]``."""
    if not prompts:
        raise ValueError("generate_codes got no prompts")
    _check_seeds(prompts, seeds, sampler)
    prefix = text_to_image_prefix(star.layout, prompts, sampler.uses_guidance)
    generators = None if sampler.greedy else make_generators(seeds)
    codes = decode_image_codes(star.model, star.codebook, prefix, star.num_tokens, sampler, generators, options, progress)
    return codes.view(len(prompts), star.grid_size, star.grid_size)


def codes_to_images(vq: VQModel, codes: torch.Tensor) -> list[Image.Image]:
    """``B x h x w`` codes -> VQ ``decode_codes`` -> RGB PIL images."""
    pixels = vq.decode_codes(codes.to(vq.quantize.embedding.weight.device)).float()
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


# ------------------------------------------------------------------------------------------ editing


@torch.no_grad()
def encode_source_image(star: Star, image: Image.Image) -> SourceImage:
    """Both encodings of an edit's source, exactly as training (stage 4) lays them out: VQ codes of a bilinear
    stretch to ``star.image_size`` and the base processor's ViT patches under ``star.edit_vit_limits``
    (:func:`lit_star.models.edit_source.encode_edit_source`)."""
    return encode_edit_source(star.vq, star.processor.image_processor, to_rgb(image), star.image_size,
                              star.edit_vit_limits)


def edit_prefix(layout: SequenceLayout, sources: Sequence[SourceImage], instructions: Sequence[str], guided: bool) -> PrefixBatch:
    """Editing prefixes; the unconditional rows keep both image encodings and blank the instruction."""
    if len(sources) != len(instructions):
        raise ValueError(f"{len(sources)} source images for {len(instructions)} instructions")

    def prefix(source: SourceImage, instruction: str, unconditional: bool) -> LayoutSample:
        return _prefix_sample(
            lambda target: layout.edit(
                instruction,
                source.codes,
                source.image_grid_thw,
                target,
                source.pixel_values,
                unconditional=unconditional,
            )
        )

    samples = [prefix(s, i, False) for s, i in zip(sources, instructions)]
    if guided:
        samples += [prefix(s, i, True) for s, i in zip(sources, instructions)]
    return collate_prefixes(samples, len(sources), layout.special.pad)


def edit_codes(
    star: Star,
    images: Sequence[Image.Image],
    instructions: Sequence[str],
    sampler: SamplerConfig,
    seeds: Sequence[int] | None = None,
    options: DecodeOptions = DecodeOptions(),
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Codes of the edited images, ``len(images) x grid x grid``."""
    if not images:
        raise ValueError("edit_codes got no images")
    _check_seeds(images, seeds, sampler)
    sources = [encode_source_image(star, image) for image in images]
    prefix = edit_prefix(star.layout, sources, instructions, sampler.uses_guidance)
    generators = None if sampler.greedy else make_generators(seeds)
    codes = decode_image_codes(star.model, star.codebook, prefix, star.num_tokens, sampler, generators, options, progress)
    return codes.view(len(images), star.grid_size, star.grid_size)


# ------------------------------------------------------------------------- understanding, reasoning


def answer_questions(
    star: Star,
    questions: Sequence[str],
    images: Sequence[Image.Image] | None = None,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers of the frozen base (one optional image per question): plain Qwen2.5-VL generation."""
    arrays = None if images is None else [np.asarray(to_rgb(image)) for image in images]
    return generate_answers(star.model.base, star.processor, list(questions), arrays, max_new_tokens=max_new_tokens)


@dataclass
class ReasonedGeneration:
    codes: torch.Tensor  # B x grid x grid
    answers: list[str]  # the base's answer to each prompt
    generation_prompts: list[str]  # what the stack was conditioned on


def reason_then_generate(
    star: Star,
    prompts: Sequence[str],
    sampler: SamplerConfig,
    seeds: Sequence[int] | None = None,
    options: DecodeOptions = DecodeOptions(),
    suffix: str = REFERENCE_REASONING_SUFFIX,
    max_answer_tokens: int = REFERENCE_MAX_ANSWER_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> ReasonedGeneration:
    """Implicit reasoning: the base answers each prompt greedily, and ``answer + suffix`` replaces the
    prompt's user text for image generation (an empty answer keeps the original prompt, as the reference)."""
    answers = answer_questions(star, prompts, max_new_tokens=max_answer_tokens)
    generation_prompts = [answer + suffix if answer else prompt for answer, prompt in zip(answers, prompts)]
    codes = generate_codes(star, generation_prompts, sampler, seeds, options, progress)
    return ReasonedGeneration(codes=codes, answers=answers, generation_prompts=generation_prompts)
