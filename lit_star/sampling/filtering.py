"""Next-token choice for image-token decoding: guidance mix, temperature, top-k then top-p, greedy.

Filtering works on the k best logits only: ``torch.topk`` returns them already sorted, so top-p's
cumulative sum runs over k values instead of a sort of the whole codebook (65,536 for STAR-VQ). The kept
set is the reference's (``top_k_top_p_filtering``: top-k threshold, then nucleus with the first token past
``top_p`` kept) whenever the k-th logit is not tied; :func:`full_sort_filter` is that formulation, kept as
the baseline of ``python -m lit_star bench generate``.

Sampling draws one uniform number per row from that row's own ``torch.Generator`` and inverts the
cumulative distribution of the kept tokens taken in token-id order, so a row's token depends only on its
logits and its generator: the same seed gives the same image whatever the batch size or the row it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

# README of MM-MVR/STAR (its argparse defaults disagree: cfg 20, top-k 2000, top-p 1.0; see the reference's argparse).
REFERENCE_CFG_SCALE = 1.1
REFERENCE_TOP_K = 1000
REFERENCE_TOP_P = 0.8


@dataclass(frozen=True)
class SamplerConfig:
    """How a next image token is chosen.

    Args:
        cfg_scale: classifier-free guidance weight w in ``uncond + w * (cond - uncond)``; 1.0 is conditional
            only (no unconditional rows are run).
        temperature: logits are divided by it before filtering (the reference ignores it; we honour it).
        top_k: keep the k most likely codes (0: no top-k).
        top_p: then keep the smallest prefix of those whose probability mass reaches ``top_p`` (1.0: no top-p).
        greedy: take the most likely code (temperature and filters are irrelevant then).
    """

    cfg_scale: float = REFERENCE_CFG_SCALE
    temperature: float = 1.0
    top_k: int = REFERENCE_TOP_K
    top_p: float = REFERENCE_TOP_P
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_scale != 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def guided_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Mix a [conditional rows; unconditional rows] batch (2B x V) into B x V guided logits."""
    if logits.shape[0] % 2:
        raise ValueError(f"guidance needs conditional and unconditional rows, got an odd batch of {logits.shape[0]}")
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k first, then top-p on the k sorted values only.

    Returns ``(values, indices)``, both B x k, values sorted descending with ``-inf`` where top-p drops a
    token. With ``top_k == 0`` every logit is a candidate (a full sort, only needed when ``top_p < 1``).
    """
    vocab = logits.shape[-1]
    k = vocab if top_k == 0 else min(top_k, vocab)
    values, indices = torch.topk(logits, k, dim=-1, sorted=True)
    if top_p < 1.0:
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass *before* it already exceeds top_p: the first token past the threshold
        # stays, and the best token always does.
        drop = torch.zeros_like(cumulative, dtype=torch.bool)
        drop[..., 1:] = cumulative[..., :-1] > top_p
        values = values.masked_fill(drop, float("-inf"))
    return values, indices


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """:func:`top_k_top_p` scattered back to B x V, ``-inf`` outside the kept set."""
    values, indices = top_k_top_p(logits, top_k, top_p)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def full_sort_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The reference's formulation (top-k threshold mask, then a sort of all V logits for top-p).

    Kept as the in-run baseline of ``bench generate`` and the equivalence test of :func:`filter_logits`.
    """
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, sorted_indices, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample, seeded with that sample's seed."""
    generators = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
        generators.append(generator)
    return generators


def sample_next_tokens(
    logits: torch.Tensor, config: SamplerConfig, generators: Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """Choose one token per row of B x V (already guided) logits; returns B int64 token ids.

    Each sampled row uses ``generators[row]`` (required unless ``config.greedy``).
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        got = "none" if generators is None else len(generators)
        raise ValueError(f"sampling needs one generator per row: {logits.shape[0]} rows, {got} generators")
    logits = logits.float() / config.temperature
    if config.top_k == 0 and config.top_p >= 1.0:
        values, indices = logits, None  # the whole distribution, already in token-id order
    else:
        values, indices = top_k_top_p(logits, config.top_k, config.top_p)
        # Back to token-id order: in probability order, a rounding-level change that swaps two nearly equal
        # logits would hand a uniform draw to a different token; in id order it only nudges a boundary.
        indices, order = indices.sort(dim=-1)
        values = values.gather(-1, order)
    cdf = values.softmax(dim=-1).cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(cdf.device)
    # u * total rather than u: the cumulative sum's last entry is 1 only up to rounding.
    choice = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True)
    choice = choice.clamp_(max=cdf.shape[-1] - 1)
    return choice.squeeze(-1) if indices is None else indices.gather(-1, choice).squeeze(-1)
