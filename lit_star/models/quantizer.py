"""STAR-VQ's vector quantizer: nearest-code search, the commitment/codebook/entropy losses, usage window.

Nearest-code search (:func:`nearest_code_indices`) runs one chunked matmul against the un-repeated codebook
with a bounded distance tile, evaluates the reference distance ``(|z|^2 + |e|^2) - 2 z.e`` in the same
floating-point order and merges tiles with strict ``<``, which reproduces ``torch.argmin``'s
first-index tie-breaking over the whole codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lit_star.models.codebook_projector import CodebookProjector
from lit_star.models.vq_config import DEFAULT_SEARCH_CHUNK_ELEMENTS, VQConfig


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
