"""Tiny stage 2 inputs built in code: a micro Qwen2.5-VL directory, a small VQ directory, and text-to-image data.

Shared by tests/test_stacked_ar_module.py and tests/test_fsdp2.py (which also runs it inside torchrun workers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lit_star.models.base_vlm import (
    Qwen2_5_VLImageTextProcessor,
    build_image_processor,
    build_tiny_base_vlm,
    save_base_vlm,
)
from lit_star.models.sequence_layout import SequenceLayout
from lit_star.models.stacked_ar import StackedAR
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.models.vq import VQConfig, VQModel, vq_config
from lit_star.sampling.modes import Star

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a yellow circle", "a blue square"]
QUESTIONS = ["How many circles are there?", "What colour is the square?"]
IMAGE_SIZE = 32
# 4x downsampling: 8 x 8 = 64 image tokens per 32 px image.
VQ_OVERRIDES = dict(
    codebook_projector=False, codebook_size=64, codebook_embed_dim=8, ch=32, z_channels=32,
    encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], num_res_blocks=1, attn_num_heads=1,
)
CODE_GRID = IMAGE_SIZE // 4


def write_micro_base(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised micro Qwen2.5-VL saved as a Hugging Face directory (stage 0's export format)."""
    torch.manual_seed(seed)
    tokenizer = train_qwen2_tokenizer((CAPTIONS + QUESTIONS) * 20, vocab_size=300, min_frequency=1)
    processor = Qwen2_5_VLImageTextProcessor(image_processor=build_image_processor("micro"), tokenizer=tokenizer)
    return save_base_vlm(build_tiny_base_vlm(tokenizer, "micro"), processor, directory)


def write_small_vq(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return VQModel(vq_config("tiny", **VQ_OVERRIDES)).save_pretrained(directory)


def build_micro_star(
    corpus: list[str], codebook_size: int, codebook_dim: int, image_size: int, vocab_size: int = 300, seed: int = 0
) -> Star:
    """An in-memory micro Star (1 stack layer, 2x VQ) with a tokenizer trained on ``corpus``, in eval mode."""
    tokenizer = train_qwen2_tokenizer(corpus, vocab_size=vocab_size, min_frequency=1)
    torch.manual_seed(seed)
    base = build_tiny_base_vlm(tokenizer, "micro").eval()
    model = StackedAR(base, num_stack_layers=1, adapter_depth=2, codebook_size=codebook_size, codebook_dim=codebook_dim)
    vq = VQModel(VQConfig(codebook_size=codebook_size, codebook_embed_dim=codebook_dim, z_channels=32, ch=32,
                          encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], num_res_blocks=1, attn_num_heads=1))
    processor = Qwen2_5_VLImageTextProcessor(image_processor=build_image_processor("micro"), tokenizer=tokenizer)
    return Star(model.eval(), vq.eval(), processor, SequenceLayout(tokenizer, base.config), image_size)


class TextToImageSamples(Dataset):
    """Deterministic image-text samples in README.md's batch item format (``image`` in [-1, 1] or ``codes``)."""

    def __init__(self, size: int, with_codes: bool = False, codebook_size: int = 64) -> None:
        self.size, self.with_codes, self.codebook_size = size, with_codes, codebook_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        sample = {"caption": CAPTIONS[index % len(CAPTIONS)], "__key__": f"sample{index:05d}"}
        if self.with_codes:
            sample["codes"] = torch.randint(0, self.codebook_size, (CODE_GRID, CODE_GRID), generator=generator)
        else:
            sample["image"] = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
        return sample


def loader(size: int, batch_size: int, with_codes: bool = False) -> DataLoader:
    return DataLoader(TextToImageSamples(size, with_codes), batch_size=batch_size, shuffle=False)
