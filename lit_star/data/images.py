"""Image decoding for the data layer: any PIL-readable bytes to an RGB float tensor in [-1, 1].

Every stage sees images the same way: decoded to RGB whatever the stored mode (1, L, LA, P with or
without transparency, RGBA, CMYK, 16-bit grayscale, ...), EXIF rotation applied, the shorter side
resized to the target resolution and the centre cropped square, then scaled to [-1, 1].

Edit pairs are the exception (``EditDataModule``): the source stays at its stored size, so that training
prepares it with the sampler's own function (``lit_star.models.edit_source.encode_edit_source``: the
reference's bilinear stretch for the VQ, its aspect ratio for the ViT), and the target is stretched the same
way (:func:`load_stretched_image_tensor`), so that an unchanged region sits at the same codes in both.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

# One conversion and one stretch for data and sampling (the sampler's edit sources go through the same ones).
from lit_star.models.edit_source import image_to_tensor as rgb_to_tensor
from lit_star.models.edit_source import stretch_to_square

# Transparent pixels are composited on white: shapes and most user images are drawn on light paper,
# and black would invent dark borders around every cut-out object.
TRANSPARENCY_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (so truncated files fail here, not later) and return an RGB image."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency on white and rescaling 16-bit grey."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert("L") clips 16-bit values at 255 instead of rescaling them.
        grey = np.asarray(image, dtype=np.int64)
        grey = np.clip(grey, 0, 65535) // 257
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENCY_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic) and crop the centre to resolution x resolution."""
    if image.size == (resolution, resolution):
        return image
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def load_image_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes to a 3 x resolution x resolution float tensor in [-1, 1]."""
    return rgb_to_tensor(resize_center_crop(decode_image(data), resolution))


def load_stored_image_tensor(data: bytes) -> torch.Tensor:
    """Encoded image bytes to a 3 x H x W float tensor in [-1, 1] at the stored size (an edit's source)."""
    return rgb_to_tensor(decode_image(data))


def load_stretched_image_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes to 3 x resolution x resolution in [-1, 1], the whole image bilinearly stretched (an
    edit's target: the same transform as its source's VQ view, :func:`stretch_to_square`)."""
    return rgb_to_tensor(stretch_to_square(decode_image(data), resolution))
