"""Codebook projector (Chang et al. 2025, FVQ's "VQBridge"), used while training STAR-VQ.

The K x D codebook is viewed as a D-channel image of h x w = K pixels, compressed by a patch embedding,
processed by adaLN (DiT-style) transformer blocks conditioned on one learned vector with a fixed 2-D
sin-cos position embedding, and mapped back by a zero-initialised linear layer plus unpatchify. There is
no residual path around it: the projected codebook *is* the codebook that the search, the VQ/commitment
losses and the straight-through estimator use, and the raw embedding and the projector train jointly.
At export :meth:`lit_star.models.vq.VQModel.reference_state_dict` stores only the projection.

    proj = CodebookProjector(codebook_size=65536, dim=512, patch_size=8)
    projected = proj(embedding.weight)      # K x D -> K x D
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def codebook_image_shape(codebook_size: int, patch_size: int) -> tuple[int, int]:
    """(h, w) with h * w = K for viewing the codebook as an image: square when K is a perfect square,
    otherwise h = floor(sqrt(2K)), w = K // h (the reference's rule); both must be divisible by the patch."""
    side = math.isqrt(codebook_size)
    if side * side == codebook_size:
        h, w = side, side
    else:
        h = math.isqrt(2 * codebook_size)
        w = codebook_size // h
    if h * w != codebook_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"codebook_size={codebook_size} cannot be viewed as an image ({h} x {w}) tiled by "
            f"projector_patch_size={patch_size}; use a power-of-two codebook or another patch size"
        )
    return h, w


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted/scaled and whose branches are gated by the
    condition (adaLN-Zero: modulation initialised to zero, so each block starts as the identity)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond).chunk(6, dim=-1)
        b, t, c = x.shape
        qkv = self.qkv(_modulate(self.norm1(x), shift_a, scale_a)).view(b, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = x + gate_a.unsqueeze(1) * self.attn_out(attn)
        return x + gate_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class CodebookProjector(nn.Module):
    """K x D codebook -> K x D projected codebook (see module docstring)."""

    def __init__(self, codebook_size: int, dim: int, patch_size: int = 8, num_heads: int = 4, head_dim: int = 16,
                 depth: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        self.codebook_size, self.dim, self.patch_size = codebook_size, dim, patch_size
        self.image_h, self.image_w = codebook_image_shape(codebook_size, patch_size)
        self.grid = (self.image_h // patch_size, self.image_w // patch_size)
        hidden = num_heads * head_dim
        self.patch_embed = nn.Conv2d(dim, hidden, kernel_size=patch_size, stride=patch_size)
        pos = get_2d_sincos_pos_embed(hidden, self.grid, base_size=self.grid[0], output_type="pt")
        # Fixed, so not a parameter and not saved: rebuilt identically from the config.
        self.register_buffer("pos_embed", pos.float().unsqueeze(0), persistent=False)
        self.condition = nn.Parameter(torch.randn(hidden) * 0.02)
        self.blocks = nn.ModuleList([AdaLNBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_linear = nn.Linear(hidden, patch_size * patch_size * dim)
        for layer in (self.final_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Patch embedding initialised like a linear layer on the flattened patch.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for block in self.blocks:
            for layer in (block.qkv, block.attn_out, block.mlp[0], block.mlp[2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, codebook: Tensor) -> Tensor:
        if codebook.shape != (self.codebook_size, self.dim):
            raise ValueError(f"expected a {self.codebook_size} x {self.dim} codebook, got {tuple(codebook.shape)}")
        p, (gh, gw) = self.patch_size, self.grid
        image = codebook.t().reshape(1, self.dim, self.image_h, self.image_w)
        x = self.patch_embed(image).flatten(2).transpose(1, 2) + self.pos_embed
        cond = self.condition.unsqueeze(0)
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        x = self.final_linear(_modulate(self.final_norm(x), shift, scale))  # 1 x (gh gw) x (p p D)
        image = x.view(gh, gw, p, p, self.dim).permute(4, 0, 2, 1, 3).reshape(self.dim, self.codebook_size)
        return image.t()
