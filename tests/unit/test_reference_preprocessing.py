"""Preprocessing that must match the reference (MM-MVR/STAR, NOTES section 2) in training and sampling alike."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from lit_star.checkpoints import load_vq
from lit_star.commands.generate import generate
from lit_star.commands.tokenize import tokenize
from lit_star.data import EditDataModule
from lit_star.models.base_vlm import (
    Qwen2_5_VLImageTextProcessor,
    build_image_processor,
    encode_chat,
    load_processor,
)
from lit_star.models.edit_source import (
    REFERENCE_EDIT_LIMITS,
    REFERENCE_GENERATION_LIMITS,
    VitPixelLimits,
    default_vit_limits,
    merged_patch,
    resolve_vit_limits,
    stretch_images,
    vit_call_args,
    vit_inputs,
)
from lit_star.models.sequence_layout import IGNORE_INDEX
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.modules.stacked_ar_module import StackedARModule
from lit_star.sampling.generations import write_generations
from lit_star.sampling.modes import (
    REFERENCE_MAX_ANSWER_TOKENS,
    Star,
    edit_prefix,
    encode_source_image,
    reason_then_generate,
)
from tests.stage2_fixtures import write_micro_base, write_small_vq


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
    # Independently: the reference (preprocess_image_with_min_size) upscales with Lanczos so that the short side
    # is 28 px, aspect kept, before the processor resizes within [28*28*16, cap]; skipping it changes the pixels.
    upscaled = np.asarray(Image.fromarray(tiny).resize((56, 28), Image.Resampling.LANCZOS))
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


# ---- edit sources: the data layer -> StackedARModule path equals the sampler's ------------------------------

VQ_SIZE = 32  # the small VQ's input side (4x downsampling: 8 x 8 codes)
# A non-square source, and one under 28 px (and under the micro base's 16 px token), both at their stored size.
SOURCE_SIZES = {"wide": (50, 30), "small": (12, 20)}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _source(name: str) -> Image.Image:
    width, height = SOURCE_SIZES[name]
    return Image.fromarray(_photo(height, width, seed=len(name)))


@pytest.fixture(scope="module")
def frozen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_source")
    return write_micro_base(root / "base"), write_small_vq(root / "vq")


@pytest.fixture(scope="module")
def edit_batch(tmp_path_factory):
    """A batch of the two sources as EditDataModule delivers it (decoded from PNG members of a shard)."""
    shard = tmp_path_factory.mktemp("edit_shard") / "edit.tar"
    with wds.TarWriter(str(shard)) as writer:
        for name in SOURCE_SIZES:
            writer.write({"__key__": name, "source.png": _png(_source(name)),
                          "target.png": _png(Image.fromarray(_photo(VQ_SIZE, VQ_SIZE, seed=9))),
                          "txt": f"make the {name} one red".encode(), "json": b"{}"})
    return next(iter(EditDataModule(train_shards=str(shard), resolution=VQ_SIZE, batch_size=2,
                                    shuffle_buffer=0).train_dataloader()))


def _module(frozen_dirs, limits: VitPixelLimits) -> StackedARModule:
    base, vq = frozen_dirs
    module = StackedARModule(base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2,
                             loss_chunk_size=48, log_images=0,
                             edit_vit_min_pixels=limits.min_pixels, edit_vit_max_pixels=limits.max_pixels,
                             edit_min_image_side=limits.min_side)
    module.configure_model()
    return module


def _code_grid(code_mask: torch.Tensor, code_ids: torch.Tensor) -> torch.Tensor:
    """The code id at each position (-1 where the input is not a code)."""
    grid = torch.full(code_mask.shape, -1, dtype=torch.long)
    grid[code_mask] = code_ids.cpu()
    return grid


@pytest.mark.parametrize("unconditional", [False, True], ids=["conditional", "unconditional"])
@pytest.mark.parametrize("limits", [VitPixelLimits(), REFERENCE_EDIT_LIMITS], ids=["base_default", "reference"])
def test_training_edit_sequence_starts_with_the_samplers_edit_prefix(frozen_dirs, edit_batch, limits, unconditional,
                                                                    monkeypatch):
    ar = _module(frozen_dirs, limits)
    # the CFG-dropout draw, decided: every training row conditional, or every one the unconditional (CFG) row
    monkeypatch.setattr(ar.layout, "draw_unconditional", lambda rng: unconditional)
    keys = list(edit_batch["__key__"])
    # training: the data layer's batch through the module (what UnifiedTuneModule.losses runs)
    target = ar.vq.encode_to_codes(edit_batch["target_image"])
    sources = ar.edit_sources(edit_batch["source_image"], vq_size=VQ_SIZE)
    train = ar.layout_edit_batch(edit_batch, target, sources, cfg_dropout=True).to("cpu")
    # sampling: the PNG files' images through the sampler
    star = Star(ar.stacked_ar, ar.vq, load_processor(frozen_dirs[0]), ar.layout, VQ_SIZE, edit_vit_limits=limits)
    prefix = edit_prefix(star.layout, [encode_source_image(star, _source(key)) for key in keys],
                         list(edit_batch["instruction"]), guided=True)
    rows = range(len(keys), 2 * len(keys)) if unconditional else range(len(keys))
    train_codes = _code_grid(train.code_mask, train.code_ids)
    prefix_codes = _code_grid(prefix.code_mask, prefix.code_ids)
    for row, prefix_row in enumerate(rows):
        length = int(prefix.attention_mask[prefix_row].sum())
        assert torch.equal(train.input_ids[row, :length], prefix.input_ids[prefix_row, -length:])
        assert torch.equal(train.position_ids[:, row, :length], prefix.position_ids[:, prefix_row, -length:])
        assert torch.equal(train_codes[row, :length], prefix_codes[prefix_row, -length:])
        # the first target code is predicted where the prefix ends, and nothing before it is a target
        assert int(train.labels[row, length - 1]) == int(target[row].flatten()[0])
        assert bool((train.labels[row, : length - 1] == IGNORE_INDEX).all())
    assert torch.equal(train.image_grid_thw, prefix.image_grid_thw[: len(keys)])
    vit_patches = int(train.image_grid_thw.prod(-1).sum())
    assert torch.equal(train.pixel_values, prefix.pixel_values[:vit_patches])
    # the non-square source keeps its aspect for the ViT; the small one was raised to the minimum
    wide, small = (train.image_grid_thw[keys.index(name)] for name in ("wide", "small"))
    assert int(wide[2]) > int(wide[1])
    factor = merged_patch(star.processor.image_processor)
    min_pixels = limits.min_pixels or star.processor.image_processor.size.shortest_edge
    assert int(small[1] * small[2]) * (factor // 2) ** 2 >= min_pixels


def test_edit_source_reaches_the_vq_as_the_references_bilinear_stretch(frozen_dirs, edit_batch, monkeypatch):
    """The reference's get_vq_transform is torchvision Resize((384, 384), BILINEAR) on a PIL image, that is PIL's
    bilinear resize of the whole image, then ToTensor and Normalize(0.5, 0.5): computed here with PIL alone."""
    ar = _module(frozen_dirs, VitPixelLimits())
    seen = []
    encode = ar.vq.encode_to_codes
    monkeypatch.setattr(ar.vq, "encode_to_codes", lambda pixels: seen.append(pixels.clone()) or encode(pixels))
    wide = edit_batch["__key__"].index("wide")
    ar.edit_sources([edit_batch["source_image"][wide]], vq_size=VQ_SIZE)
    image = _source("wide")
    stretched = np.asarray(image.resize((VQ_SIZE, VQ_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = (torch.from_numpy(stretched).permute(2, 0, 1) / 255 - 0.5) / 0.5
    assert len(seen) == 1 and torch.allclose(seen[0][0], expected, atol=1e-6)
    # what the data layer did before (resize the short side, centre crop) is a different image
    cropped = ImageOps.fit(image, (VQ_SIZE, VQ_SIZE), method=Image.Resampling.BICUBIC)
    cropped = (torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1) / 255 - 0.5) / 0.5
    assert (cropped - expected).abs().max() > 0.5


def test_decoder_sources_are_stretched_to_the_target_side_and_square_ones_kept():
    wide = torch.from_numpy(np.asarray(_source("wide"))).permute(2, 0, 1).float() / 127.5 - 1
    square = torch.rand(3, VQ_SIZE, VQ_SIZE) * 2 - 1  # not on the uint8 grid: kept, never re-quantised
    out = stretch_images([wide, square], VQ_SIZE)
    expected = np.asarray(_source("wide").resize((VQ_SIZE, VQ_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    assert torch.allclose(out[0], torch.from_numpy(expected).permute(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert torch.equal(out[1], square)


def test_pretokenized_edit_targets_are_the_codes_of_the_batchs_stretched_target(frozen_dirs, tmp_path):
    target = _source("wide")  # non-square: a crop and a stretch give different codes
    sample = {"__key__": "wide", "source.png": _png(target), "target.png": _png(target), "txt": b"make it red",
              "json": b"{}"}
    with wds.TarWriter(str(tmp_path / "edit.tar")) as writer:
        writer.write(sample)
    vq = load_vq(frozen_dirs[1]).eval()
    expected = vq.encode_to_codes(next(iter(EditDataModule(train_shards=str(tmp_path / "edit.tar"), resolution=VQ_SIZE,
                                                            batch_size=1).train_dataloader()))["target_image"])[0]
    codes = {}
    for resize in ("stretch", "crop"):
        out = tmp_path / resize
        assert tokenize(str(tmp_path / "edit.tar"), str(out), vq=str(frozen_dirs[1]), resolution=VQ_SIZE,
                        device="cpu", resize=resize) == 0
        member = next(iter(wds.WebDataset(str(out / "edit.tar"), shardshuffle=False, empty_check=False)))
        codes[resize] = torch.from_numpy(np.load(io.BytesIO(member["target.codes.npy"])).astype(np.int64))
    assert torch.equal(codes["stretch"], expected)
    assert not torch.equal(codes["crop"], expected)
