"""STAR-VQ's convolutional encoder and decoder (LlamaGen / STAR-VQ shape), in the reference's operation order
so that codes are bit-identical on the same hardware."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor



def swish(x: Tensor) -> Tensor:
    # x * sigmoid(x) rather than F.silu: the same arithmetic as the reference, for bit-identical codes.
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class PositionwiseLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the channels of each position of a B x C x H x W map."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def spatial_conv(in_channels: int, out_channels: int, local: bool) -> nn.Conv2d:
    """The reference's 3x3 convolution; 1x1 in a local encoder, so no position sees its neighbours."""
    if local:
        return nn.Conv2d(in_channels, out_channels, kernel_size=1)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, local: bool = False):
        super().__init__()
        norm = PositionwiseLayerNorm if local else group_norm
        self.norm1 = norm(in_channels)
        self.conv1 = spatial_conv(in_channels, out_channels, local)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = spatial_conv(out_channels, out_channels, local)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all positions, with 1x1-conv q/k/v/proj_out (reference names)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        h = self.norm(x)
        # Channel-major head split (b, heads, head_dim, hw), as the reference lays the heads out.
        q = self.q(h).reshape(b, heads, head_dim, hgt * wid).transpose(2, 3)
        k = self.k(h).reshape(b, heads, head_dim, hgt * wid)
        v = self.v(h).reshape(b, heads, head_dim, hgt * wid)
        # Explicit softmax attention, in the reference's operation order (scores scaled after the matmul).
        scores = torch.softmax((q @ k) * head_dim**-0.5, dim=3)
        out = (v @ scores.transpose(2, 3)).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (the reference's); in a local encoder a 2x2 conv over non-overlapping blocks."""

    def __init__(self, channels: int, local: bool = False):
        super().__init__()
        self.local = local
        self.conv = nn.Conv2d(channels, channels, kernel_size=2 if local else 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.local:
            return self.conv(x)
        # Asymmetric (left 0, right 1, top 0, bottom 1) padding: torch convs only pad symmetrically.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """conv_in -> levels of res blocks (+attention at the lowest level) and downsampling -> mid -> z."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, dropout: float,
                 attn_num_heads: int, in_channels: int = 3, local: bool = False):
        super().__init__()
        self.conv_in = spatial_conv(in_channels, ch, local)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            lowest = level == len(ch_mult) - 1
            level_block = nn.Module()
            level_block.res = nn.ModuleList()
            level_block.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level_block.res.append(ResnetBlock(block_in, ch * mult, dropout, local))
                block_in = ch * mult
                if lowest and not local:
                    level_block.attn.append(AttnBlock(block_in, attn_num_heads))
            if not lowest:
                level_block.downsample = Downsample(block_in, local)
            self.conv_blocks.append(level_block)
        middle = [] if local else [AttnBlock(block_in, attn_num_heads)]
        self.mid = nn.ModuleList([
            ResnetBlock(block_in, block_in, dropout, local), *middle, ResnetBlock(block_in, block_in, dropout, local),
        ])
        self.norm_out = PositionwiseLayerNorm(block_in) if local else group_norm(block_in)
        self.conv_out = spatial_conv(block_in, z_channels, local)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level_block in self.conv_blocks:
            for i, res in enumerate(level_block.res):
                h = res(h)
                if len(level_block.attn):
                    h = level_block.attn[i](h)
            if hasattr(level_block, "downsample"):
                h = level_block.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """z -> conv_in -> mid -> levels (lowest first) of res blocks (+attention) and upsampling -> RGB."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, dropout: float,
                 attn_num_heads: int, out_channels: int = 3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.ModuleList([
            ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in, attn_num_heads),
            ResnetBlock(block_in, block_in, dropout),
        ])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            lowest = level == len(ch_mult) - 1
            level_block = nn.Module()
            level_block.res = nn.ModuleList()
            level_block.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level_block.res.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if lowest:
                    level_block.attn.append(AttnBlock(block_in, attn_num_heads))
            if level != 0:
                level_block.upsample = Upsample(block_in)
            self.conv_blocks.append(level_block)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the last conv: where an adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level_block in self.conv_blocks:
            for i, res in enumerate(level_block.res):
                h = res(h)
                if len(level_block.attn):
                    h = level_block.attn[i](h)
            if hasattr(level_block, "upsample"):
                h = level_block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# --------------------------------------------------------------------------- quantizer
