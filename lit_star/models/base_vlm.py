"""The base vision-language model STAR builds on: Qwen2.5-VL through transformers.

One code path serves every size. A released Qwen2.5-VL-3B/7B directory and the tiny Shapes base
exported by stage 0 are both plain Hugging Face directories, loaded with
``Qwen2_5_VLForConditionalGeneration.from_pretrained(dir, dtype=...)``. The ``tiny`` flavour builds
a small Qwen2.5-VL (vision tower included) from a config, for tests and the CPU world.

The accessors at the bottom (:func:`decoder_layers`, :func:`final_norm`, ...) name the submodules
that STAR touches in the transformers 5 layout, so no other module spells out attribute paths.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lit_star.models.edit_source import VitPixelLimits, vit_call_args
from lit_star.models.tokenizer import special_token_ids


@dataclass(frozen=True)
class TinyBaseSpec:
    """Sizes of a small Qwen2.5-VL.

    Vision geometry: each LLM vision token covers ``patch_size * spatial_merge_size`` pixels per side
    of the ``image_size`` px image the processor resizes to. The tiny base keeps Qwen's 2x2 merging
    and lines its tokens up with the Shapes world's 3 x 3 grid of object cells: a 64 px world image is
    upsampled to 96 px, cut into 6 x 6 patches of 16 px, and merged into 3 x 3 LLM tokens, one per
    cell, so every object is centred on the same four patches of its own token. The first geometry
    tried, 16 px patches without merging (4 x 4 tokens straddling the cells), left stage 0 answering
    from the language prior: after 900 steps shape questions were at 0.22 and colour questions at 0.45,
    against 0.93 and 0.52 with the cell-aligned tokens (same recipe, same data; docs/base.md).
    """

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    # With Qwen's contiguous split and head_dim 32, the width axis gets only frequencies below 0.004 rad
    # per position: a 3 x 3 token grid has no usable left/right signal in the LLM's attention.
    interleaved_mrope: bool = False
    # With interleaving, which axis takes the fastest frequency, the next and the third (then repeating).
    # Image tokens share one t, so Qwen's order "thw" spends the fastest rotation (1 rad per position)
    # on an axis that does not vary inside the image and leaves the width axis the third (0.42 rad per
    # column at theta 1000).
    mrope_axis_order: str = "thw"
    max_position_embeddings: int = 2048
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 192
    vision_depth: int = 2
    vision_num_heads: int = 2
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Pixels per window side for the windowed-attention blocks: 32 px = one merged token (one cell).
    window_size: int = 32
    image_size: int = 96

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """Split of the rotary half-dimension over (t, h, w), the config's ``mrope_section``.

        Qwen's split is contiguous, [16, 24, 24] for head_dim 128: t takes the highest frequencies and w
        the lowest. transformers assigns section i to axis i % 3, so a list of 1s interleaves the axes
        over the frequencies instead (``interleaved_mrope``), and empty sections put them in
        ``mrope_axis_order`` ("wht": [0, 0, 1, 0, 1, 0, 1, ...]).
        """
        half = self.head_dim // 2
        if sorted(self.mrope_axis_order) != sorted("thw"):
            raise ValueError(f"mrope_axis_order must order the axes t, h and w, got {self.mrope_axis_order!r}")
        if self.interleaved_mrope:
            # transformers gives section i to axis i % 3, so empty sections skip to the wanted axis.
            sections: list[int] = []
            for frequency in range(half):
                axis = "thw".index(self.mrope_axis_order[frequency % 3])
                sections += [0] * ((axis - len(sections)) % 3) + [1]
            return sections
        if self.mrope_axis_order != "thw":
            raise ValueError("mrope_axis_order other than 'thw' needs interleaved_mrope")
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


TINY_FLAVOURS: dict[str, TinyBaseSpec] = {
    # The Shapes world base: ~1.2M parameters (text 4 x 128, vision 2 x 64), stage 0 in minutes on one CPU core.
    # Interleaved M-RoPE at theta 1000 gives the image grid's rows and columns rotations of 0.65 and
    # 0.42 rad per cell (Qwen's split at theta 1e4: 0.1 and 0.0032), and text 1 down to 0.0015 rad per token.
    "tiny": TinyBaseSpec(interleaved_mrope=True, rope_theta=1000.0),
    # ~60M parameters with its stack (flavour "mid" of lit_star.models.flavours): 512 wide, 8 layers.
    "mid": TinyBaseSpec(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, max_position_embeddings=4096),
    # For unit tests: builds and runs a forward pass in milliseconds.
    "micro": TinyBaseSpec(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_depth=2,
        vision_num_heads=2,
        # Qwen's own geometry (small patches, 2x2 merging), so tests cover the patch merger path.
        patch_size=8,
        spatial_merge_size=2,
        image_size=64,
    ),
}


def tiny_spec(flavour: str | TinyBaseSpec, overrides: dict | None = None) -> TinyBaseSpec:
    """The spec of ``flavour`` (a ``TINY_FLAVOURS`` key or a spec) with ``overrides`` applied."""
    if isinstance(flavour, TinyBaseSpec):
        spec = flavour
    elif flavour in TINY_FLAVOURS:
        spec = TINY_FLAVOURS[flavour]
    else:
        raise KeyError(f"unknown tiny base flavour {flavour!r}; choose from {sorted(TINY_FLAVOURS)}")
    if not overrides:
        return spec
    fields = {f.name for f in dataclasses.fields(TinyBaseSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KeyError(f"unknown tiny base spec field(s) {unknown}; the fields are {sorted(fields)}")
    return dataclasses.replace(spec, **overrides)


def tiny_config(tokenizer, flavour: str | TinyBaseSpec = "tiny") -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given flavour whose token ids match ``tokenizer``."""
    spec = tiny_spec(flavour)
    if spec.hidden_size % spec.num_attention_heads or spec.head_dim % 2:
        raise ValueError(f"hidden_size {spec.hidden_size} must split into an even head_dim over {spec.num_attention_heads} heads")
    ids = special_token_ids(tokenizer)
    # Round the embedding table up like Qwen does (151936 rows for 151665 tokens).
    vocab_size = -(-len(tokenizer) // 64) * 64
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": spec.mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "window_size": spec.window_size,
        # Qwen alternates windowed blocks with a full-attention block every 8; here the last block is full.
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_base_vlm(tokenizer, flavour: str | TinyBaseSpec = "tiny") -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised tiny Qwen2.5-VL (fp32) sized for ``tokenizer``."""
    return Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, flavour))


def load_base_vlm(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> Qwen2_5_VLForConditionalGeneration:
    """Load any Qwen2.5-VL Hugging Face directory (3B, 7B, or a stage 0 export) from local disk."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Processor


def build_image_processor(
    flavour: str | TinyBaseSpec = "tiny",
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image preprocessing (resize to a multiple of the merged patch, normalise, patchify).

    ``min_pixels`` is one ``image_size`` px square, so smaller images (the world's 64 px ones) are
    upsampled to it, and ``max_pixels`` caps inputs at a 4x larger side. ``image_mean``/``image_std`` default to CLIP's
    (Qwen's); a from-scratch tower should get its training images' own statistics (see
    :func:`pixel_statistics`).
    """
    spec = tiny_spec(flavour)
    factor = spec.patch_size * spec.spatial_merge_size
    if spec.image_size % factor:
        raise ValueError(f"image_size {spec.image_size} must be a multiple of patch_size * spatial_merge_size = {factor}")
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        min_pixels=spec.image_size * spec.image_size,
        max_pixels=16 * spec.image_size * spec.image_size,
        **({"image_mean": list(image_mean)} if image_mean is not None else {}),
        **({"image_std": list(image_std)} if image_std is not None else {}),
    )


def pixel_statistics(images: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of ``B x 3 x H x W`` batches in [-1, 1].

    Why it matters: under CLIP's statistics a Shapes image is mostly one large constant (the plain
    background), every vision token of every image looked alike (cosine ~0.94 at init), and the tiny
    tower collapsed to a constant output; with the world's own statistics it learns within steps.
    """
    pixels = torch.cat([batch.detach().float().cpu() for batch in images]).add(1.0).div(2.0)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected B x 3 x H x W images, got {tuple(pixels.shape)}")
    return pixels.mean(dim=(0, 2, 3)).tolist(), pixels.std(dim=(0, 2, 3)).tolist()


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only.

    The stock processor also builds a video processor, which needs torchvision (not installable beside
    CPU torch here). Declaring only ``image_processor`` and ``tokenizer`` in ``__init__`` makes
    ``ProcessorMixin`` manage just those two; image tokenisation, ``image_grid_thw`` and
    ``mm_token_type_ids`` (which M-RoPE needs) behave exactly as in the stock processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_processor(path: str | os.PathLike) -> Qwen2_5_VLImageTextProcessor:
    """Processor of a Qwen2.5-VL directory (``tokenizer*`` + ``preprocessor_config.json``), without torchvision."""
    path = Path(path)
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path} has no preprocessor_config.json (Qwen2-VL image processor settings)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return Qwen2_5_VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


IGNORE_INDEX = -100


def images_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """``B x 3 x H x W`` floats in [-1, 1] (the data layer's format) -> HWC uint8 arrays for the processor.

    The processor then does what it does to any photo (resize, CLIP normalisation), so training sees the
    same pixels as ``understand`` on a PNG.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape B x 3 x H x W, got {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).numpy())


def chat_prompts(tokenizer, questions: list[str], with_image: bool) -> list[str]:
    """Each question as a one-turn user conversation, rendered up to the open assistant turn."""
    prompts = []
    for question in questions:
        content = [{"type": "image"}, {"type": "text", "text": question}] if with_image else question
        prompts.append(
            tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        )
    return prompts


def encode_chat(
    processor: Qwen2_5_VLImageTextProcessor,
    questions: list[str],
    images: list[np.ndarray] | None = None,
    answers: list[str] | None = None,
    vit_limits: VitPixelLimits | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for single-turn chats, one optional image each.

    Without ``answers``: left-padded prompts ending in the open assistant turn, ready for ``generate``.
    With ``answers``: right-padded full conversations plus ``labels`` that are ``-100`` everywhere except
    the answer tokens and the closing ``<|im_end|>`` (so the model learns to stop).

    The images go to the ViT under ``vit_limits``; unset fields take the base's default for generation and
    understanding (:func:`lit_star.models.edit_source.default_vit_limits`: the reference's 28*28*16 to
    28*28*1024 pixels for a Qwen2.5-VL base), so training and answering see the same inputs.
    """
    tokenizer = processor.tokenizer
    if images is not None and len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions")
    prompts = chat_prompts(tokenizer, questions, with_image=images is not None)
    size_kwargs: dict = {}
    if images is not None:
        images, size_kwargs = vit_call_args(processor.image_processor, images, vit_limits, edit=False)
    if answers is None:
        return dict(processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt",
                              **size_kwargs))
    if len(answers) != len(questions):
        raise ValueError(f"got {len(answers)} answers for {len(questions)} questions")
    targets = [answer + "<|im_end|>" for answer in answers]
    encoded = dict(
        processor(
            text=[p + t for p, t in zip(prompts, targets)],
            images=images,
            padding=True,
            padding_side="right",
            return_tensors="pt",
            **size_kwargs,
        )
    )
    input_ids = encoded["input_ids"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    for row, (length, ids) in enumerate(zip(lengths, target_ids)):
        start = length - len(ids)
        # The chat template ends the prompt with a newline, which the pre-tokeniser always splits off,
        # so the answer tokenises the same alone as inside the conversation; check it anyway.
        if input_ids[row, start:length].tolist() != ids:
            raise ValueError(f"answer {answers[row]!r} does not tokenise the same inside the conversation")
        labels[row, start:length] = input_ids[row, start:length]
    encoded["labels"] = labels
    return encoded


@torch.no_grad()
def generate_answers(
    model: Qwen2_5_VLForConditionalGeneration,
    processor: Qwen2_5_VLImageTextProcessor,
    questions: list[str],
    images: list[np.ndarray] | None = None,
    max_new_tokens: int = 32,
    vit_limits: VitPixelLimits | None = None,
) -> list[str]:
    """Greedy answers of the base to single-turn questions (with one image each, or text only); images under
    ``vit_limits`` as in :func:`encode_chat`."""
    tokenizer = processor.tokenizer
    inputs = encode_chat(processor, questions, images, vit_limits=vit_limits)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def save_base_vlm(model: Qwen2_5_VLForConditionalGeneration, processor: Qwen2_5_VLImageTextProcessor, out_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face directory laid out like a released Qwen2.5-VL one.

    ``config.json`` + ``model.safetensors`` + ``generation_config.json``, the tokenizer files with the
    chat template, and ``preprocessor_config.json`` for the image processor.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Named submodules (transformers 5 layout: model.model.language_model / model.model.visual / lm_head)


def language_model(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    """The text decoder (``Qwen2_5_VLTextModel``): embeddings, layers, norm, rotary embedding."""
    return model.model.language_model


def decoder_layers(model: Qwen2_5_VLForConditionalGeneration) -> nn.ModuleList:
    return model.model.language_model.layers


def final_norm(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    return model.model.language_model.norm


def embed_tokens(model: Qwen2_5_VLForConditionalGeneration) -> nn.Embedding:
    return model.model.language_model.embed_tokens


def rotary_embedding(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    """Call as ``rotary_embedding(model)(hidden, position_ids)`` -> ``(cos, sin)`` with M-RoPE sections merged."""
    return model.model.language_model.rotary_emb


def vision_tower(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    return model.model.visual


def lm_head(model: Qwen2_5_VLForConditionalGeneration) -> nn.Linear:
    return model.lm_head


def text_config(model: Qwen2_5_VLForConditionalGeneration):
    return model.config.text_config
