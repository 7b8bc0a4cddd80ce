"""The source image of an edit in both encodings the stack reads, prepared as the reference prepares it.

One function for training (stage 4) and sampling (``lit_star.sampling.modes.encode_source_image``), so an
edit sample's prefix is the same token for token in both.

The reference (MM-MVR/STAR, NOTES section 2) prepares the source differently for its two encoders:

* images with a side under 28 px are first upscaled (``preprocess_image_with_min_size``, Lanczos), for both;
* the VQ gets a bilinear *stretch* of the whole image to the square VQ resolution (``get_vq_transform``:
  torchvision ``Resize`` on a PIL image, i.e. PIL's bilinear resize), not a centre crop, so no part of the
  image the instruction may refer to is cut away;
* the ViT gets the image at its own aspect ratio through Qwen2.5-VL's ``smart_resize`` with the reference's
  pixel limits: at least 28*28*16 pixels, at most 28*28*576 for editing (28*28*1024 for generation and
  understanding).

The diffusion decoder's view of the source is the same stretch to its output side (``get_full_transform``;
:func:`stretch_images` in training, ``generate edit --decoder.kind diffusion`` in sampling), and the data
layer stretches an edit's *target* the same way (``lit_star.data.images``), so the parts of a pair that the
edit leaves alone sit at the same codes and latents.

The ViT limits of generation and understanding prompts are applied here too (:func:`vit_call_args`, used by
``lit_star.models.base_vlm.encode_chat``, which both base training and ``answer_questions`` go through).
The reference's pixel counts are Qwen2.5-VL's 28 px per LLM token; a base with another merged patch (the tiny
worlds' bases) keeps its processor's own limits (:func:`resolve_vit_limits`), so the Shapes world's inputs do
not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

# The reference's ViT pixel limits (Qwen2.5-VL's 14 px patches merged 2 x 2: one LLM token per 28 x 28 pixels).
REFERENCE_VIT_MIN_PIXELS = 28 * 28 * 16
REFERENCE_VIT_MAX_PIXELS_EDIT = 28 * 28 * 576
REFERENCE_VIT_MAX_PIXELS = 28 * 28 * 1024  # generation and understanding
REFERENCE_MIN_IMAGE_SIDE = 28
# Qwen2.5-VL's merged patch (the side of one LLM vision token): the geometry the numbers above are made for.
REFERENCE_MERGED_PATCH = 28


@dataclass(frozen=True)
class VitPixelLimits:
    """Pixel limits of the ViT input and the side under which images are upscaled first.

    Given to :func:`vit_call_args`, an unset field (``None``) takes the base's default
    (:func:`default_vit_limits`); after that, ``None`` limits are the processor's own and ``min_side`` ``None``
    upscales nothing."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    min_side: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "min_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")


REFERENCE_EDIT_LIMITS = VitPixelLimits(REFERENCE_VIT_MIN_PIXELS, REFERENCE_VIT_MAX_PIXELS_EDIT, REFERENCE_MIN_IMAGE_SIDE)
REFERENCE_GENERATION_LIMITS = VitPixelLimits(REFERENCE_VIT_MIN_PIXELS, REFERENCE_VIT_MAX_PIXELS, REFERENCE_MIN_IMAGE_SIDE)


def merged_patch(image_processor) -> int:
    """Pixels per side of one LLM vision token (``patch_size * merge_size``: 28 for Qwen2.5-VL)."""
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def default_vit_limits(image_processor, edit: bool) -> VitPixelLimits:
    """The ViT limits a base gets when none are given: the reference's (edit sources or generation and
    understanding prompts) for Qwen2.5-VL's 28 px token. For another geometry those pixel counts would mean
    other token counts, so the processor's own limits stand there; images smaller than one token are upscaled."""
    factor = merged_patch(image_processor)
    if factor == REFERENCE_MERGED_PATCH:
        return REFERENCE_EDIT_LIMITS if edit else REFERENCE_GENERATION_LIMITS
    return VitPixelLimits(min_side=factor)


def resolve_vit_limits(image_processor, limits: VitPixelLimits | None, edit: bool) -> VitPixelLimits:
    """``limits`` with each unset (``None``) field taken from :func:`default_vit_limits`."""
    default = default_vit_limits(image_processor, edit)
    if limits is None:
        return default
    merged = {f.name: getattr(default, f.name) if getattr(limits, f.name) is None else getattr(limits, f.name)
              for f in fields(VitPixelLimits)}
    return VitPixelLimits(**merged)


@dataclass
class SourceImage:
    """A source image in both encodings the stack reads: VQ codes and the ViT's patches."""

    codes: torch.Tensor  # h x w
    pixel_values: torch.Tensor  # patches x patch_dim
    image_grid_thw: torch.Tensor  # 1 x 3


def upscale_small_image(image: Image.Image, min_side: int) -> Image.Image:
    """The reference's ``preprocess_image_with_min_size``: an image with a side under ``min_side`` is scaled (Lanczos,
    aspect kept, sizes truncated as there) so that its shorter side is ``min_side``; larger images unchanged."""
    width, height = image.size
    if width >= min_side and height >= min_side:
        return image
    scale = max(min_side / height, min_side / width)
    return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)


def stretch_to_square(image: Image.Image, size: int) -> Image.Image:
    """The whole ``image`` bilinearly stretched to ``size x size`` (no crop): the reference's ``get_vq_transform`` and
    ``get_full_transform``, torchvision ``Resize((size, size), BILINEAR)`` applied to a PIL image, which is PIL's
    bilinear resize (antialiased when shrinking)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``3 x H x W`` in [-1, 1] (the data layer's format)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def stretch_images(images: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """``B x 3 x size x size`` in [-1, 1]: each image (``3 x H x W`` in [-1, 1], any size) through
    :func:`stretch_to_square`; an image already ``size x size`` is kept as it is."""
    out = []
    for image in images:
        if tuple(image.shape[-2:]) != (size, size):
            image = image_to_tensor(stretch_to_square(tensor_to_image(image), size))
        out.append(image.float().cpu())
    return torch.stack(out)


def vit_call_args(image_processor, images, limits: VitPixelLimits | None, edit: bool) -> tuple[list[np.ndarray], dict]:
    """What the processor is called with for ``images`` (PIL images or HWC uint8 arrays) under ``limits``
    (unset fields: the base's default, :func:`resolve_vit_limits`): the arrays, small ones upscaled first, and
    the ``size`` override of its pixel limits (none when both are the processor's own)."""
    limits = resolve_vit_limits(image_processor, limits, edit)
    arrays = []
    for image in images:
        array = np.asarray(image)
        if limits.min_side is not None and min(array.shape[:2]) < limits.min_side:
            array = np.asarray(upscale_small_image(Image.fromarray(array), limits.min_side))
        arrays.append(array)
    kwargs = {}
    if limits.min_pixels is not None or limits.max_pixels is not None:
        size = image_processor.size
        kwargs["size"] = {
            "shortest_edge": limits.min_pixels if limits.min_pixels is not None else size.shortest_edge,
            "longest_edge": limits.max_pixels if limits.max_pixels is not None else size.longest_edge,
        }
    return arrays, kwargs


def vit_inputs(image_processor, image: Image.Image, limits: VitPixelLimits | None = None, edit: bool = True):
    """``(pixel_values, image_grid_thw)`` of ``image`` for the base's ViT under ``limits`` (see :func:`vit_call_args`)."""
    arrays, kwargs = vit_call_args(image_processor, [image], limits, edit)
    out = image_processor(images=arrays, return_tensors="pt", **kwargs)
    return out["pixel_values"], out["image_grid_thw"]


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """``3 x H x W`` in [-1, 1] (the data layer's format) -> an RGB PIL image, rounding as ``images_to_uint8``."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


@torch.no_grad()
def encode_edit_source(vq, image_processor, image: Image.Image, vq_size: int,
                       limits: VitPixelLimits | None = None) -> SourceImage:
    """Both encodings of an edit's source ``image`` (RGB PIL) as the reference's ``preprocess_image_gen``: a small
    image is upscaled first, then the VQ codes of its bilinear stretch to ``vq_size`` and the ViT patches under
    ``limits`` (unset fields: the edit default, :func:`default_vit_limits`)."""
    limits = resolve_vit_limits(image_processor, limits, edit=True)
    if limits.min_side is not None:
        image = upscale_small_image(image, limits.min_side)
    weight = vq.quantize.embedding.weight
    vq_input = image_to_tensor(stretch_to_square(image, vq_size)).unsqueeze(0).to(weight.device, weight.dtype)
    codes = vq.encode_to_codes(vq_input)[0].cpu()
    pixel_values, grid = vit_inputs(image_processor, image, limits, edit=True)
    return SourceImage(codes=codes, pixel_values=pixel_values, image_grid_thw=grid)
