"""STAR-VQ: the VQGAN-style image tokenizer of stage 1 (LlamaGen / STAR-VQ shape).

    from lit_star.models.vq import VQModel, vq_config
    vq = VQModel.from_pretrained("VQ-Model.pt", vq_config("star-vq"))   # released weights
    codes = vq.encode_to_codes(images)          # images in [-1, 1], B x 3 x H x W -> B x h x w int64
    images = vq.decode_codes(codes)             # B x 3 x H x W, raw decoder output (about [-1, 1])
    vectors = vq.codebook_vectors(codes)        # codes.shape + (D,): what the stage-2 adapter consumes

Parameter names follow the reference ``VQ-Model.pt`` layout exactly (``encoder.conv_blocks.{i}.res.{j}``,
``quantize.embedding.weight``, the ``quantize.codebook_used`` window buffer, ...), so a released file loads
strictly and :meth:`VQModel.reference_state_dict` writes one back. Encoder, decoder and attention evaluate
in the reference's operation order so that codes are bit-identical on the same hardware.

Nearest-code search (:func:`nearest_code_indices`) runs one chunked matmul against the un-repeated codebook
with a bounded distance tile, evaluates the reference distance ``(|z|^2 + |e|^2) - 2 z.e`` in the same
floating-point order and merges tiles with strict ``<``, which reproduces ``torch.argmin``'s
first-index tie-breaking over the whole codebook.

Flavours (``VQ_FLAVOURS``): ``star-vq`` (paper), ``vqgan-16384x8`` (Table 6a baseline, LlamaGen VQ-16)
and ``tiny`` (CPU / Shapes world, see its comment).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lit_star.models.codebook_projector import CodebookProjector

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys that exist only while training with the codebook projector; never exported.
PROJECTOR_PREFIX = "quantize.projector."
# Default bound on one distance tile (rows x codes fp32 values, 4 MiB); see nearest_code_indices.
DEFAULT_SEARCH_CHUNK_ELEMENTS = 1 << 20


@dataclass
class VQConfig:
    """Hyper-parameters of :class:`VQModel`. Field names mirror the reference's ``ModelArgs``."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = False
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    attn_num_heads: int = 1
    dropout_p: float = 0.0
    # A local encoder makes each code a function of its own f x f pixel patch (f = downsample_factor)
    # only: 1x1 convolutions, non-overlapping 2x2 stride-2 downsampling, a per-position channel LayerNorm
    # instead of GroupNorm (whose statistics span the whole image) and no self-attention. The reference
    # encoder is global: one object in a corner changes every code of the image, and codes next to an
    # object depend on it, so an AR model must predict an object before reaching its first pixel. The
    # decoder is unchanged (it sees all codes). Not in the reference (False there).
    local_encoder: bool = False
    # Codebook projector (FVQ "VQBridge"): training only, folded into the codebook at export.
    codebook_projector: bool = False
    projector_patch_size: int = 8
    projector_num_heads: int = 4
    projector_head_dim: int = 16
    projector_depth: int = 2
    projector_mlp_ratio: float = 2.0
    # Bound on one distance tile of the nearest-code search (rows x codes).
    search_chunk_elements: int = DEFAULT_SEARCH_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        self.encoder_ch_mult = list(self.encoder_ch_mult)
        self.decoder_ch_mult = list(self.decoder_ch_mult)
        for name in ("ch", "z_channels"):
            if getattr(self, name) % 32:
                raise ValueError(f"VQConfig.{name}={getattr(self, name)} must be a multiple of 32 (GroupNorm(32))")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            if not getattr(self, name):
                raise ValueError(f"VQConfig.{name} must not be empty")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult {self.decoder_ch_mult} "
                "must have the same length (same downsampling factor)"
            )
        lowest = self.ch * self.encoder_ch_mult[-1]
        if lowest % self.attn_num_heads:
            raise ValueError(f"attn_num_heads={self.attn_num_heads} must divide the lowest-resolution width {lowest}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def usage_window(self) -> int:
        """Length of the ``codebook_used`` buffer, as in the reference: 65,536, or K+1 for K >= 65,536."""
        return 65536 if self.codebook_size < 65536 else self.codebook_size + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "VQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VQConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


VQ_FLAVOURS: dict[str, dict] = {
    # The paper's STAR-VQ: 16x downsampling, 65,536 x 512 codebook, 8-head attention (NOTES section 2).
    "star-vq": dict(
        codebook_size=65536, codebook_embed_dim=512, z_channels=512, ch=256,
        encoder_ch_mult=[1, 2, 2, 4, 8], decoder_ch_mult=[1, 2, 2, 4, 8], attn_num_heads=8,
        codebook_projector=True, projector_patch_size=8,
    ),
    # Table 6a baseline: LlamaGen's VQ-16 (16,384 x 8 codes, ch 128, ch_mult [1,1,2,2,4], z 256, 1 head).
    "vqgan-16384x8": dict(
        codebook_size=16384, codebook_embed_dim=8, z_channels=256, ch=128,
        encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4], attn_num_heads=1,
    ),
    # CPU / Shapes world: 4x downsampling (16 x 16 codes at 64 px). 16x would give 4 x 4 codes at 64 px,
    # far too coarse for ~28 dB PSNR; 4x keeps 256 codes per image so a small codebook reconstructs the
    # flat-coloured shapes' edges. Width 32 (64 at the lowest level, 2 heads) keeps a training step on one
    # CPU core well under a second. 1,024 x 16 codes: a 32 x 32 codebook image, projector patch 4 -> 64 tokens.
    "tiny": dict(
        codebook_size=1024, codebook_embed_dim=16, z_channels=32, ch=32,
        encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], num_res_blocks=1, attn_num_heads=2,
        codebook_projector=True, projector_patch_size=4, projector_num_heads=2, projector_head_dim=16,
    ),
}


def vq_config(name: str, **overrides) -> VQConfig:
    """The registered flavour ``name`` (see ``VQ_FLAVOURS``) with ``overrides`` applied."""
    if name not in VQ_FLAVOURS:
        raise KeyError(f"unknown VQ flavour {name!r}; choose from {sorted(VQ_FLAVOURS)}")
    return VQConfig.from_dict({**VQ_FLAVOURS[name], **overrides})


# --------------------------------------------------------------------------- building blocks


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


def _blockwise_squared_norms(x: Tensor, block_bytes: int = 1 << 19) -> Tensor:
    """``torch.sum(x**2, dim=1)`` computed on row blocks of about ``block_bytes``: the same per-row
    arithmetic (so the same bits) without an N x D temporary; small blocks also stay below the allocator's
    mmap threshold, so they are reused instead of growing the heap."""
    rows = max(1, block_bytes // (x.shape[1] * x.element_size()))
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], rows):
        torch.sum(x[i:i + rows] ** 2, dim=1, out=out[i:i + rows])
    return out


@torch.no_grad()
def nearest_code_indices(z: Tensor, codebook: Tensor, chunk_elements: int = DEFAULT_SEARCH_CHUNK_ELEMENTS) -> Tensor:
    """Index of the nearest codebook row for every row of ``z`` (N x D against K x D), int64 of shape (N,).

    Distances are ``(|z|^2 + |e|^2) - 2 z.e`` evaluated in exactly the reference's floating-point order
    (sum of the squared norms first, then minus twice the dot product). Keeping ``|z|^2`` matters for
    reproducing the reference: it is constant per row, but adding it first rounds the distances, and two
    codes whose distances differ only below that rounding become an exact tie, which ``argmin`` resolves
    to the lower index (tests/test_vq_model.py constructs such a case).

    The codebook is never copied: each tile is one ``mm`` of a block of rows against a contiguous block
    of codebook rows, with at most ``chunk_elements`` distances alive per tile (two buffers of that size).
    Tiles are merged left to right with a strict ``<``, so the first minimal index wins, as in
    ``torch.argmin`` over the full row. Runs in fp32 whatever the input dtype.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z N x D and codebook K x D, got {tuple(z.shape)} and {tuple(codebook.shape)}")
    z = z.float().contiguous()
    codebook = codebook.float().contiguous()
    num_rows, num_codes = z.shape[0], codebook.shape[0]
    # Up to 1,024 rows per tile (enough to keep the matmul efficient), then as many codes as the budget allows.
    row_tile = max(1, min(num_rows, 1024, chunk_elements))
    code_tile = max(1, min(num_codes, chunk_elements // row_tile))
    z_sq = _blockwise_squared_norms(z)
    code_sq = _blockwise_squared_norms(codebook)
    dots = torch.empty(row_tile * code_tile, dtype=torch.float32, device=z.device)
    dists = torch.empty_like(dots)
    indices = torch.empty(num_rows, dtype=torch.long, device=z.device)
    for r0 in range(0, num_rows, row_tile):
        rows = z[r0:r0 + row_tile]
        n = rows.shape[0]
        best_val = best_idx = None
        for c0 in range(0, num_codes, code_tile):
            codes = codebook[c0:c0 + code_tile]
            k = codes.shape[0]
            dot = torch.mm(rows, codes.t(), out=dots[: n * k].view(n, k))
            dist = torch.add(z_sq[r0:r0 + n, None], code_sq[None, c0:c0 + k], out=dists[: n * k].view(n, k))
            dist.sub_(dot, alpha=2)
            val, idx = torch.min(dist, dim=1)
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val < best_val
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx + c0, best_idx)
        indices[r0:r0 + n] = best_idx
    return indices


def entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """LlamaGen's codebook entropy loss: mean per-sample entropy minus entropy of the mean assignment.

    ``affinity`` is N x K (negative distances); low sample entropy with high average entropy = confident and
    diverse code assignments.
    """
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    mean_probs = probs.mean(dim=0)
    mean_entropy = -torch.sum(mean_probs * torch.log(mean_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - mean_entropy


@dataclass
class QuantizerOutput:
    """What one quantization step produced.

    ``quantized`` is B x D x h x w with straight-through gradients to the encoder; ``codes`` B x h x w int64.
    ``codebook_loss`` = mean |sg(z) - e|^2 (trains the codebook / projector), ``commitment_loss`` =
    beta * mean |z - sg(e)|^2 (trains the encoder), ``entropy_loss`` = ratio * entropy term (zero tensor
    when the ratio is 0). ``codebook_usage`` is the fraction of codes seen in the ``codebook_used`` window
    (updated in training mode only); ``perplexity`` is exp(entropy) of this batch's code histogram.
    """

    quantized: Tensor
    codes: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    entropy_loss: Tensor
    codebook_usage: float
    perplexity: Tensor


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.embed_dim = config.codebook_embed_dim
        self.beta = config.commit_loss_beta
        self.entropy_loss_ratio = config.entropy_loss_ratio
        self.l2_norm = config.codebook_l2_norm
        self.search_chunk_elements = config.search_chunk_elements
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Sliding window of the most recent training codes (reference name and length). -1 marks "empty",
        # so the reported utilisation counts only codes actually produced.
        self.register_buffer("codebook_used", torch.full((config.usage_window,), -1, dtype=torch.long))
        self.projector = (
            CodebookProjector(
                config.codebook_size, config.codebook_embed_dim, patch_size=config.projector_patch_size,
                num_heads=config.projector_num_heads, head_dim=config.projector_head_dim,
                depth=config.projector_depth, mlp_ratio=config.projector_mlp_ratio,
            )
            if config.codebook_projector else None
        )

    def codebook(self) -> Tensor:
        """The K x D codebook the search uses: projected when the projector is on, l2-normalised if enabled.

        Always fp32, also under autocast: a bf16 codebook would change codes and the VQ losses."""
        weight = self.embedding.weight.float()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            if self.projector is not None:
                weight = self.projector(weight)
            return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize encoder features ``z`` (B x D x h x w). Runs in fp32 whatever the autocast state."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook()
        flat = z.view(-1, d)
        codes = nearest_code_indices(flat.detach(), codebook.detach(), self.search_chunk_elements)
        # F.embedding, not codebook[codes]: the backward of advanced indexing (index_put_ with accumulate)
        # sums the gradient of a code used many times in an order that changes from run to run on more
        # than one CPU thread, and those last bits decide later codes.
        z_q = F.embedding(codes, codebook).view(b, h, w, d)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        commitment_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
        if self.entropy_loss_ratio > 0:
            # Needs the full N x K distance matrix (with gradient), so it is only built when asked for.
            dist = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1) - 2 * flat @ codebook.t()
            ent = self.entropy_loss_ratio * entropy_loss(-dist)
        else:
            ent = z.new_zeros(())
        if self.training:
            self._record_usage(codes)
        quantized = (z + (z_q - z).detach()).permute(0, 3, 1, 2)
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs.clamp_min(1e-12))))
        return QuantizerOutput(
            quantized=quantized, codes=codes.view(b, h, w), codebook_loss=codebook_loss,
            commitment_loss=commitment_loss, entropy_loss=ent, codebook_usage=self.codebook_usage(),
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _record_usage(self, codes: Tensor) -> None:
        window = self.codebook_used
        n = min(codes.numel(), window.numel())
        window[: window.numel() - n] = window[n:].clone()
        window[window.numel() - n:] = codes.reshape(-1)[-n:].to(window.dtype)

    @torch.no_grad()
    def codebook_usage(self) -> float:
        """Fraction of the codebook present in the recent-codes window."""
        seen = self.codebook_used[self.codebook_used >= 0]
        return torch.unique(seen).numel() / self.codebook_size


# --------------------------------------------------------------------------- model


@dataclass
class VQOutput:
    """Training forward result: ``reconstruction`` B x 3 x H x W plus the quantizer's losses and stats."""

    reconstruction: Tensor
    quantizer: QuantizerOutput

    @property
    def codes(self) -> Tensor:
        return self.quantizer.codes


class VQModel(nn.Module):
    """Encoder -> quant_conv -> vector quantizer -> post_quant_conv -> decoder."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        common = dict(ch=config.ch, num_res_blocks=config.num_res_blocks, z_channels=config.z_channels,
                      dropout=config.dropout_p, attn_num_heads=config.attn_num_heads)
        self.encoder = Encoder(ch_mult=config.encoder_ch_mult, local=config.local_encoder, **common)
        self.decoder = Decoder(ch_mult=config.decoder_ch_mult, **common)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    # ---- training

    def forward(self, images: Tensor) -> VQOutput:
        """Reconstruct ``images`` ([-1, 1], B x 3 x H x W, H and W divisible by the downsampling factor)."""
        quant = self.quantize(self.quant_conv(self.encoder(self._check_images(images))))
        return VQOutput(reconstruction=self.decode_quantized(quant.quantized), quantizer=quant)

    def decode_quantized(self, quantized: Tensor) -> Tensor:
        """B x D x h x w code vectors -> B x 3 x H x W images."""
        return self.decoder(self.post_quant_conv(quantized))

    # ---- inference API

    @torch.no_grad()
    def encode_to_codes(self, images: Tensor) -> Tensor:
        """[-1, 1] images B x 3 x H x W -> B x h x w int64 codes (h = H / downsample_factor)."""
        z = self.quant_conv(self.encoder(self._check_images(images)))
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.quantize.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        return nearest_code_indices(flat, self.quantize.codebook(), self.quantize.search_chunk_elements).view(b, h, w)

    def codebook_vectors(self, codes: Tensor) -> Tensor:
        """Codebook rows for ``codes`` of any shape: returns ``codes.shape + (D,)`` (B x h x w x D for a grid,
        B x L x D for a flattened sequence). These are the D-dim vectors the stage-2 adapter consumes."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes.long(), self.quantize.codebook())

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """B x h x w integer codes -> B x 3 x H x W images (raw decoder output, about [-1, 1], not clamped)."""
        if codes.ndim != 3:
            raise ValueError(f"decode_codes expects B x h x w codes, got shape {tuple(codes.shape)}")
        return self.decode_quantized(self.codebook_vectors(codes).permute(0, 3, 1, 2).contiguous())

    def _check_images(self, images: Tensor) -> Tensor:
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"expected B x 3 x H x W images with H, W divisible by {f}, got {tuple(images.shape)}")
        return images

    # ---- export / import

    @torch.no_grad()
    def reference_state_dict(self) -> dict[str, Tensor]:
        """State dict in the reference ``VQ-Model.pt`` layout: the projector folded into the codebook.

        The folded ``quantize.embedding.weight`` is the projector's output (before any l2 normalisation,
        which the reference applies at use), so codes and decodes are unchanged by export.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(PROJECTOR_PREFIX)}
        if self.quantize.projector is not None:
            state["quantize.embedding.weight"] = self.quantize.projector(self.quantize.embedding.weight).detach().clone()
        return state

    def exported_config(self) -> VQConfig:
        """The config matching :meth:`reference_state_dict` (projector folded away)."""
        return dataclasses.replace(self.config, codebook_projector=False)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (reference key layout, projector folded) and ``config.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.reference_state_dict().items()}, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.exported_config().to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, config: VQConfig | str | None = None,
                        map_location: str | torch.device = "cpu") -> "VQModel":
        """Load a reference-layout raw state dict (``VQ-Model.pt``) or a :meth:`save_pretrained` directory.

        ``config`` (a :class:`VQConfig` or flavour name) is required for a ``.pt`` file; for a directory it
        defaults to its ``config.json``. Loading is strict: a missing or unexpected key raises an error
        naming the keys. Any projector in ``config`` is switched off, since exported weights are folded.
        """
        path = Path(path)
        if path.is_dir():
            config_file = path / CONFIG_FILE
            if config is None:
                if not config_file.is_file():
                    raise FileNotFoundError(f"{config_file} not found: pass config= or export with save_pretrained")
                config = VQConfig.from_dict(json.loads(config_file.read_text()))
            from safetensors.torch import load_file

            weights = path / WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found in {path}")
            state = load_file(str(weights), device=str(map_location))
        elif path.is_file():
            if config is None:
                raise ValueError(f"{path} is a raw state dict: pass config= (a VQConfig or a flavour name)")
            state = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{path} is not a raw state dict of tensors (reference VQ-Model.pt layout)")
        else:
            raise FileNotFoundError(f"no VQ checkpoint at {path}")
        if isinstance(config, str):
            config = vq_config(config)
        model = cls(dataclasses.replace(config, codebook_projector=False))
        model.load_reference_state_dict(state, source=str(path))
        return model

    def load_reference_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Strictly load a reference-layout state dict; errors name missing/unexpected/mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mis_shaped:
            lines = [f"{source} does not match the VQ config:"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {missing[:20]}")
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
            for k in mis_shaped[:20]:
                lines.append(f"  shape mismatch {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
            raise KeyError("\n".join(lines))
        # codebook_used is stored as float in fresh reference checkpoints; load_state_dict casts it.
        self.load_state_dict(state, strict=True)

    @torch.no_grad()
    def fold_codebook_projector(self) -> None:
        """Replace the codebook by its projection and drop the projector (e.g. before tokenizing)."""
        if self.quantize.projector is None:
            return
        self.quantize.embedding.weight.copy_(self.quantize.projector(self.quantize.embedding.weight))
        self.quantize.projector = None
        self.config = self.exported_config()


def parameter_counts(model: VQModel) -> dict[str, int]:
    """Parameters per part (encoder, decoder, quantizer incl. projector, quant convs)."""
    parts = {"encoder": model.encoder, "decoder": model.decoder, "quantize": model.quantize,
             "quant_convs": nn.ModuleList([model.quant_conv, model.post_quant_conv])}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
