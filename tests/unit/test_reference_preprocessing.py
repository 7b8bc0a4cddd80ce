"""Preprocessing that must match the reference (MM-MVR/STAR, NOTES section 2) in training and sampling alike."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lit_star.commands.generate import generate
from lit_star.models.base_vlm import Qwen2_5_VLImageTextProcessor, build_image_processor, encode_chat
from lit_star.models.edit_source import (
    REFERENCE_EDIT_LIMITS,
    REFERENCE_GENERATION_LIMITS,
    VitPixelLimits,
    default_vit_limits,
    merged_patch,
    resolve_vit_limits,
    vit_call_args,
    vit_inputs,
)
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.sampling.generations import write_generations
from lit_star.sampling.modes import REFERENCE_MAX_ANSWER_TOKENS, reason_then_generate


def test_reasoning_answer_budget_is_the_references_256_tokens_everywhere():
    assert REFERENCE_MAX_ANSWER_TOKENS == 256
    for entry in (reason_then_generate, write_generations, generate):
        assert inspect.signature(entry).parameters["max_answer_tokens"].default == 256, entry.__qualname__


# ---- ViT pixel limits --------------------------------------------------------------------------------------

QWEN_PATCH = 14  # Qwen2.5-VL: 14 px patches merged 2 x 2, one LLM token per 28 x 28 px


def _pixels(grid_thw: torch.Tensor) -> int:
    """Pixels the ViT saw for one image (t=1): grid height x width in 14 px patches."""
    return int(grid_thw[0, 1] * grid_thw[0, 2]) * QWEN_PATCH * QWEN_PATCH


@pytest.fixture(scope="module")
def qwen_processor() -> Qwen2_5_VLImageTextProcessor:
    """The released Qwen2.5-VL's image geometry and stock limits (56*56 to 28*28*1280 px), a tiny tokenizer."""
    tokenizer = train_qwen2_tokenizer(["how many circles", "a red circle"] * 20, vocab_size=300, min_frequency=1)
    image_processor = Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_understanding_and_generation_images_are_capped_at_28x28x1024_pixels(qwen_processor):
    large = _photo(1500, 2000)
    stock = qwen_processor.image_processor(images=[large], return_tensors="pt")["image_grid_thw"]
    assert _pixels(stock) > 28 * 28 * 1024, "the stock limit must be looser, or this test checks nothing"
    prompt_only = encode_chat(qwen_processor, ["how many circles"], [large])
    with_answer = encode_chat(qwen_processor, ["how many circles"], [large], ["a red circle"])
    for inputs in (prompt_only, with_answer):
        pixels = _pixels(inputs["image_grid_thw"])
        assert 28 * 28 * 576 < pixels <= 28 * 28 * 1024  # the generation cap, not the edit one
        image_pad = qwen_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((inputs["input_ids"] == image_pad).sum()) == pixels // (28 * 28)


def test_edit_sources_are_capped_at_28x28x576_pixels(qwen_processor):
    _, grid = vit_inputs(qwen_processor.image_processor, Image.fromarray(_photo(1500, 2000)))
    assert 28 * 28 * 400 < _pixels(grid) <= 28 * 28 * 576


@pytest.mark.parametrize("edit", [True, False])
def test_images_under_28_px_are_upscaled_then_raised_to_the_minimum(qwen_processor, edit):
    tiny = _photo(10, 20, seed=1)
    arrays, kwargs = vit_call_args(qwen_processor.image_processor, [tiny], None, edit=edit)
    image_processor = qwen_processor.image_processor
    ours = image_processor(images=arrays, return_tensors="pt", **kwargs)
    assert _pixels(ours["image_grid_thw"]) >= 28 * 28 * 16
    # Independently: the reference upscales the image so its short side is 28 px (aspect kept) before the
    # processor resizes it within [28*28*16, cap]; without that first step the pixels would differ.
    upscaled = np.asarray(Image.fromarray(tiny).resize((56, 28), Image.Resampling.BICUBIC))
    cap = 28 * 28 * (576 if edit else 1024)
    expected = image_processor(images=[upscaled], return_tensors="pt",
                               size={"shortest_edge": 28 * 28 * 16, "longest_edge": cap})
    direct = image_processor(images=[tiny], return_tensors="pt",
                             size={"shortest_edge": 28 * 28 * 16, "longest_edge": cap})
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])
    assert not torch.equal(ours["pixel_values"], direct["pixel_values"])


@pytest.mark.parametrize("flavour", ["tiny", "micro"])
def test_tiny_world_bases_keep_their_processors_own_limits(flavour):
    """The reference's pixel counts are for 28 px tokens: the Shapes world's base (flavour tiny, 32 px tokens)
    must see its 64 px images exactly as before, in understanding and in edits."""
    image_processor = build_image_processor(flavour)
    assert default_vit_limits(image_processor, edit=False) == VitPixelLimits(min_side=merged_patch(image_processor))
    image = _photo(64, 64, seed=2)
    plain = image_processor(images=[image], return_tensors="pt")
    for edit in (True, False):
        arrays, kwargs = vit_call_args(image_processor, [image], None, edit=edit)
        assert kwargs == {} and arrays[0] is image
        pixel_values, grid = vit_inputs(image_processor, Image.fromarray(image), edit=edit)
        assert torch.equal(pixel_values, plain["pixel_values"]) and torch.equal(grid, plain["image_grid_thw"])


def test_given_limits_override_the_default_field_by_field(qwen_processor):
    image_processor = qwen_processor.image_processor
    assert default_vit_limits(image_processor, edit=True) == REFERENCE_EDIT_LIMITS
    assert default_vit_limits(image_processor, edit=False) == REFERENCE_GENERATION_LIMITS
    resolved = resolve_vit_limits(image_processor, VitPixelLimits(max_pixels=28 * 28 * 64), edit=True)
    assert resolved == VitPixelLimits(28 * 28 * 16, 28 * 28 * 64, 28)
    with pytest.raises(ValueError, match="min_pixels"):
        resolve_vit_limits(image_processor, VitPixelLimits(max_pixels=28 * 28 * 4), edit=True)
