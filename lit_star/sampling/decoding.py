"""Autoregressive image-token decoding through the frozen base and the stack, with KV caches for both.

The prefix (prompt, and for editing the source image) runs once; after that every new code is one
incremental step of one token through the base and the stack, each attending to its own KV cache::

    prefill(prefix)          -> logits at <|vision_start|>   -> code 0
    step(adapter(codebook[code i]), position p+i+1) -> logits -> code i+1

Rows are left-padded so that every row's next token sits in the same column; padded rows get positions
counted from their first real token, so a prompt decodes the same alone or beside longer ones.
Classifier-free guidance stacks the unconditional rows under the conditional ones (2B rows), mixes the two
halves and feeds the chosen code to both.

``DecodeOptions(static_cache=True)`` preallocates the caches (``transformers.StaticCache``) and keeps
every step's tensors the same shape, which is what ``compile=True`` (``torch.compile`` of the step,
GPU oriented) needs to avoid recompiling at every position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import StaticCache

from lit_star.models.base_vlm import text_config
from lit_star.models.sequence_layout import LayoutSample
from lit_star.models.stacked_ar import StackedAR
from lit_star.sampling.filtering import SamplerConfig, guided_logits, sample_next_tokens

CodebookLookup = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PrefixBatch:
    """Left-padded generation prefixes: rows ``[0, num_samples)`` conditional, then (with guidance) the
    unconditional rows of the same samples in the same order."""

    input_ids: torch.Tensor  # R x T
    code_mask: torch.Tensor  # R x T bool: VQ-code inputs (editing source image)
    code_ids: torch.Tensor  # codes of those positions, row-major
    attention_mask: torch.Tensor  # R x T long, 1 = real token
    position_ids: torch.Tensor  # 3 x R x T (M-RoPE; plain text positions for text-to-image)
    num_samples: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.input_ids.shape[0] == 2 * self.num_samples

    def to(self, device: torch.device | str) -> PrefixBatch:
        moved = {
            name: value.to(device)
            for name, value in vars(self).items()
            if isinstance(value, torch.Tensor)
        }
        return replace(self, **moved)


def collate_prefixes(samples: Sequence[LayoutSample], num_samples: int, pad_id: int) -> PrefixBatch:
    """Left-pad laid-out prefixes (conditional rows first, then any unconditional rows)."""
    if len(samples) not in (num_samples, 2 * num_samples):
        raise ValueError(f"{len(samples)} prefixes for {num_samples} samples: expected {num_samples} or {2 * num_samples}")
    length = max(len(s.input_ids) for s in samples)
    rows = len(samples)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    code_mask = torch.zeros(rows, length, dtype=torch.bool)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    position_ids = torch.zeros(3, rows, length, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, length - n :] = sample.input_ids
        code_mask[row, length - n :] = sample.code_mask
        attention_mask[row, length - n :] = 1
        position_ids[:, row, length - n :] = sample.position_ids
    with_vit = [s for s in samples if s.image_grid_thw is not None]
    if with_vit and any(s.pixel_values is None for s in with_vit):
        raise ValueError("a prefix has <|image_pad|> positions but no pixel_values")
    return PrefixBatch(
        input_ids=input_ids,
        code_mask=code_mask,
        code_ids=torch.cat([s.code_ids for s in samples]),
        attention_mask=attention_mask,
        position_ids=position_ids,
        num_samples=num_samples,
        pixel_values=torch.cat([s.pixel_values for s in with_vit]) if with_vit else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in with_vit]) if with_vit else None,
    )


@dataclass(frozen=True)
class DecodeOptions:
    """Execution of the decode loop (results are the same up to float rounding).

    Args:
        static_cache: preallocated KV caches and fixed-shape step inputs.
        compile: ``torch.compile`` the one-token step (implies ``static_cache``; meant for GPUs).
        compile_mode: passed to ``torch.compile`` (``reduce-overhead`` adds CUDA graphs).
        compile_backend: ``torch.compile`` backend (``inductor``; ``eager`` only traces, for checks).
    """

    static_cache: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"

    @property
    def uses_static_cache(self) -> bool:
        return self.static_cache or self.compile


class _Step:
    """One incremental token through base + stack + head: ``(code vectors, positions, mask) -> logits``."""

    def __init__(self, model: StackedAR, caches) -> None:
        self.model = model
        self.caches = caches

    def __call__(self, code_vectors: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.model.embed_codes(code_vectors).unsqueeze(1).to(self.model.base.dtype)
        hidden = self.model(embeds, position_ids, attention_mask, caches=self.caches)
        return self.model.logits(hidden[:, -1])


_COMPILED_STEPS: dict[tuple, Callable] = {}


def _compiled_step(options: DecodeOptions) -> Callable:
    """A compiled step function reused across calls (same options -> same compiled graph cache)."""
    key = (options.compile_mode, options.compile_backend)
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(
            _Step.__call__, mode=options.compile_mode, backend=options.compile_backend, dynamic=False
        )
    return _COMPILED_STEPS[key]


def new_static_caches(model: StackedAR, max_length: int) -> tuple[StaticCache, StaticCache]:
    """Preallocated (base, stack) KV caches for ``max_length`` tokens."""
    return (
        StaticCache(config=text_config(model.base), max_cache_len=max_length),
        StaticCache(config=model.stack.config, max_cache_len=max_length),
    )


@torch.no_grad()
def decode_image_codes(
    model: StackedAR,
    codebook: CodebookLookup,
    prefix: PrefixBatch,
    num_tokens: int,
    sampler: SamplerConfig,
    generators: Sequence[torch.Generator] | None = None,
    options: DecodeOptions = DecodeOptions(),
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Decode ``num_tokens`` image codes per sample with KV caches; returns ``num_samples x num_tokens``.

    Args:
        model: the stacked AR (eval mode).
        codebook: maps integer codes (any shape) to raw codebook vectors (``VQModel.codebook_vectors``).
        prefix: the prompts (see :func:`collate_prefixes`); with unconditional rows, logits are guided with
            ``sampler.cfg_scale``.
        generators: one per sample (not per row) unless ``sampler.greedy``.
        progress: called with 1 after each decoded token.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    device = model.stack.norm.weight.device
    prefix = prefix.to(device)
    rows, prefix_length = prefix.input_ids.shape
    total = prefix_length + num_tokens - 1  # the last code is never fed back
    caches = new_static_caches(model, total) if options.uses_static_cache else model.new_caches()
    step = _Step(model, caches)
    step_fn = (lambda *args: _compiled_step(options)(step, *args)) if options.compile else step

    attention_mask = torch.zeros(rows, total, dtype=torch.long, device=device)
    attention_mask[:, :prefix_length] = prefix.attention_mask
    embeds = model.embed_inputs(
        prefix.input_ids,
        prefix.code_mask,
        codebook(prefix.code_ids),
        prefix.pixel_values,
        prefix.image_grid_thw,
    )
    prefill_mask = attention_mask if options.uses_static_cache else attention_mask[:, :prefix_length]
    hidden = model(embeds.to(model.base.dtype), prefix.position_ids, prefill_mask, caches=caches)
    logits = model.logits(hidden[:, -1])
    # Tokens after the prefix continue its text positions (M-RoPE gives text after an image max + 1).
    next_position = prefix.position_ids[:, :, -1:] + 1

    codes = torch.empty(prefix.num_samples, num_tokens, dtype=torch.long, device=device)
    for index in range(num_tokens):
        mixed = guided_logits(logits, sampler.cfg_scale) if prefix.guided else logits
        token = sample_next_tokens(mixed, sampler, generators)
        codes[:, index] = token
        if progress is not None:
            progress(1)
        if index == num_tokens - 1:
            break
        row_tokens = token.repeat(2) if prefix.guided else token
        column = prefix_length + index
        attention_mask[:, column] = 1
        step_mask = attention_mask if options.uses_static_cache else attention_mask[:, : column + 1]
        logits = step_fn(codebook(row_tokens), next_position + index, step_mask)
    return codes


@torch.no_grad()
def decode_image_codes_without_cache(
    model: StackedAR,
    codebook: CodebookLookup,
    prefix: PrefixBatch,
    num_tokens: int,
    sampler: SamplerConfig,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Same contract as :func:`decode_image_codes`, but every step reruns the whole sequence so far.

    The correctness reference for the cached loop and the baseline of ``bench generate`` (cost grows
    with the square of the length).
    """
    device = model.stack.norm.weight.device
    prefix = prefix.to(device)
    rows = prefix.input_ids.shape[0]
    prefix_embeds = model.embed_inputs(
        prefix.input_ids, prefix.code_mask, codebook(prefix.code_ids), prefix.pixel_values, prefix.image_grid_thw
    ).to(model.base.dtype)
    last_position = prefix.position_ids[:, :, -1:]
    codes = torch.empty(prefix.num_samples, num_tokens, dtype=torch.long, device=device)
    fed: list[torch.Tensor] = []
    for index in range(num_tokens):
        steps = torch.arange(1, index + 1, device=device).view(1, 1, -1)
        position_ids = torch.cat([prefix.position_ids, last_position + steps], dim=-1)
        attention_mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(rows, index)], dim=1)
        embeds = prefix_embeds
        if fed:
            code_embeds = model.embed_codes(codebook(torch.stack(fed, dim=1))).to(prefix_embeds.dtype)
            embeds = torch.cat([prefix_embeds, code_embeds], dim=1)
        logits = model.logits(model(embeds, position_ids, attention_mask)[:, -1])
        mixed = guided_logits(logits, sampler.cfg_scale) if prefix.guided else logits
        token = sample_next_tokens(mixed, sampler, generators)
        codes[:, index] = token
        fed.append(token.repeat(2) if prefix.guided else token)
    return codes
