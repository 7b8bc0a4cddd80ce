"""STAR-VQ's configuration and its named flavours (``VQ_FLAVOURS``): ``star-vq`` (paper), ``vqgan-16384x8``
(Table 6a baseline, LlamaGen VQ-16) and ``tiny`` (CPU / Shapes world, see its comment)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Default bound on one distance tile (rows x codes fp32 values, 4 MiB); see quantizer.nearest_code_indices.
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
    # The paper's STAR-VQ: 16x downsampling, 65,536 x 512 codebook, 8-head attention (paper Table 9 and the reference implementation).
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
