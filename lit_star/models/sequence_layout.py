"""Training sequences for the stacked AR, laid out exactly as the reference's inference builds them.

Text-to-image (the reference implementation's layout)::

    chat_template(user prompt) + "<|im_start|>assistant\\n"  <|vision_start|>  c0 c1 ... c574
                                                                 predicts c0   c1 ...     c575

The first code is predicted at ``<|vision_start|>``; code i is the input that predicts code i+1, so the
last code is never an input. VQ-code inputs carry the ``<|vision_pad|>`` id (their embedding is replaced
by ``adapter(codebook[code])``) and 1-D text positions.

Classifier-free guidance row (``unconditional=True``): same length, prompt token 0 kept, everything up to
the last 4 prompt tokens (``<|im_start|>assistant\\n<|vision_start|>``) replaced by ``<|fim_pad|>``.

Editing: right after ``<|im_start|>user\\n`` the source image enters twice,
``<|vision_start|> VQ codes <|vision_end|> <|vision_start|> <|image_pad|>*n <|vision_end|> \\n``; only the ViT
``<|image_pad|>`` tokens get 3-D M-RoPE positions. The unconditional edit row blanks the text only and keeps
both image encodings.

Batches are padded (``attention_mask``) or packed (4-row ``position_ids`` whose first row restarts at 0 for
every sample, which is how transformers' masking finds sample boundaries; no ``attention_mask``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from lit_star.models.tokenizer import special_token_ids

IGNORE_INDEX = -100
USER_HEADER = "<|im_start|>user\n"
# <|im_start|> assistant \n <|vision_start|>: what the reference keeps at the end of an unconditional row.
UNCONDITIONAL_KEPT_TAIL = 4


@dataclass(frozen=True)
class SpecialTokenIds:
    vision_start: int
    vision_end: int
    vision_pad: int  # VQ-code inputs
    image_pad: int  # ViT features
    fim_pad: int  # blanked prompt tokens of the unconditional row
    pad: int  # batch padding
    newline: tuple[int, ...]
    user_header: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokenIds:
        ids = special_token_ids(tokenizer)
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token (Qwen uses <|endoftext|>)")
        return cls(
            vision_start=ids["<|vision_start|>"],
            vision_end=ids["<|vision_end|>"],
            vision_pad=ids["<|vision_pad|>"],
            image_pad=ids["<|image_pad|>"],
            fim_pad=ids["<|fim_pad|>"],
            pad=tokenizer.pad_token_id,
            newline=tuple(tokenizer.encode("\n", add_special_tokens=False)),
            user_header=tuple(tokenizer.encode(USER_HEADER, add_special_tokens=False)),
        )


@dataclass
class LayoutSample:
    """One laid-out sequence of length L."""

    input_ids: torch.Tensor  # L, long
    code_mask: torch.Tensor  # L, bool: inputs that are VQ codes
    code_ids: torch.Tensor  # code_mask.sum(), long: those codes in order
    labels: torch.Tensor  # L, long: code predicted at each position, IGNORE_INDEX elsewhere
    mm_token_type_ids: torch.Tensor  # L, int: 1 at <|image_pad|> (ViT) positions
    position_ids: torch.Tensor  # 3 x L, M-RoPE
    pixel_values: torch.Tensor | None = None  # ViT patches of the <|image_pad|> positions
    image_grid_thw: torch.Tensor | None = None  # n_images x 3


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # B x T
    code_mask: torch.Tensor  # B x T
    code_ids: torch.Tensor  # N codes, row-major order of code_mask
    labels: torch.Tensor  # B x T
    position_ids: torch.Tensor  # 3 x B x T (padded) or 4 x B x T (packed)
    attention_mask: torch.Tensor | None = None  # B x T, padded batches only
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    samples_per_row: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> SequenceBatch:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else None
            for f in fields(self)
            if f.name != "samples_per_row"
        }
        return replace(self, **moved)


class _RopeIndexer:
    """Just enough of ``Qwen2_5_VLModel`` to call its own ``get_rope_index`` (it reads only the config)."""

    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

    def __init__(self, config: Qwen2_5_VLConfig) -> None:
        self.config = config


def unconditional_prompt_ids(prompt_ids: Sequence[int], fim_pad: int) -> list[int]:
    """The reference's CFG row: token 0 kept, ``<|fim_pad|>`` in between, the last 4 tokens kept."""
    if len(prompt_ids) <= UNCONDITIONAL_KEPT_TAIL + 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens is too short for an unconditional row")
    middle = len(prompt_ids) - 1 - UNCONDITIONAL_KEPT_TAIL
    return [prompt_ids[0], *([fim_pad] * middle), *prompt_ids[-UNCONDITIONAL_KEPT_TAIL:]]


def text_positions(length: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + length).expand(3, length).clone()


class SequenceLayout:
    """Builds :class:`LayoutSample` s for one tokenizer (Qwen special tokens + chat template) and base config."""

    def __init__(self, tokenizer, model_config: Qwen2_5_VLConfig, cfg_dropout: float = 0.1) -> None:
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        self.tokenizer = tokenizer
        self.special = SpecialTokenIds.from_tokenizer(tokenizer)
        if self.special.image_pad != model_config.image_token_id:
            raise ValueError(
                f"tokenizer's <|image_pad|> is {self.special.image_pad}, the model's image_token_id is "
                f"{model_config.image_token_id}"
            )
        self.cfg_dropout = cfg_dropout
        self.spatial_merge_size = model_config.vision_config.spatial_merge_size
        self._rope = _RopeIndexer(model_config)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat template with the user prompt and the assistant header, then ``<|vision_start|>``."""
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [*self.tokenizer.encode(text), self.special.vision_start]

    def unconditional_prompt_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        return unconditional_prompt_ids(prompt_ids, self.special.fim_pad)

    def draw_unconditional(self, rng: random.Random) -> bool:
        """CFG dropout: True with probability ``cfg_dropout``."""
        return rng.random() < self.cfg_dropout

    def text_to_image(self, prompt: str, codes: torch.Tensor, *, unconditional: bool = False) -> LayoutSample:
        """Sequence that teaches the flattened (raster order) ``codes`` given ``prompt``."""
        codes = _flat_codes(codes)
        prompt_ids = self.prompt_ids(prompt)
        if unconditional:
            prompt_ids = self.unconditional_prompt_ids(prompt_ids)
        return self._with_target(prompt_ids, codes, prefix_codes=[], prefix_code_mask=[], mm_types=None, grid=None)

    def edit(
        self,
        instruction: str,
        source_codes: torch.Tensor,
        image_grid_thw: torch.Tensor,
        target_codes: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        unconditional: bool = False,
    ) -> LayoutSample:
        """Editing sequence: the source image (VQ codes + ViT features of grid ``image_grid_thw``) in the user
        turn, then the target codes. ``pixel_values`` are the ViT patches for that grid (carried along)."""
        special = self.special
        source_codes = _flat_codes(source_codes)
        grid = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(1, 3)
        n_vit = int(grid.prod()) // self.spatial_merge_size**2
        prompt_ids = self.prompt_ids(instruction)
        insert_at = _find_after(prompt_ids, special.user_header)
        if unconditional:
            prompt_ids = self.unconditional_prompt_ids(prompt_ids)
        image_block = [
            special.vision_start,
            *([special.vision_pad] * len(source_codes)),
            special.vision_end,
            special.vision_start,
            *([special.image_pad] * n_vit),
            special.vision_end,
            *special.newline,
        ]
        ids = [*prompt_ids[:insert_at], *image_block, *prompt_ids[insert_at:]]
        code_mask = [False] * len(ids)
        code_mask[insert_at + 1 : insert_at + 1 + len(source_codes)] = [True] * len(source_codes)
        mm_types = [int(t == special.image_pad) for t in ids]
        sample = self._with_target(
            ids, _flat_codes(target_codes), source_codes.tolist(), code_mask, mm_types=mm_types, grid=grid
        )
        sample.pixel_values = pixel_values
        sample.image_grid_thw = grid
        return sample

    def _with_target(
        self,
        prefix_ids: list[int],
        target_codes: torch.Tensor,
        prefix_codes: list[int],
        prefix_code_mask: list[bool],
        mm_types: list[int] | None,
        grid: torch.Tensor | None,
    ) -> LayoutSample:
        n_inputs = len(target_codes) - 1  # the last code is predicted, never fed back
        ids = torch.tensor([*prefix_ids, *([self.special.vision_pad] * n_inputs)], dtype=torch.long)
        length = len(ids)
        code_mask = torch.zeros(length, dtype=torch.bool)
        code_mask[: len(prefix_code_mask)] = torch.tensor(prefix_code_mask, dtype=torch.bool)
        code_mask[len(prefix_ids) :] = True
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        labels[len(prefix_ids) - 1 :] = target_codes
        code_ids = torch.tensor([*prefix_codes, *target_codes[:n_inputs].tolist()], dtype=torch.long)
        types = torch.zeros(length, dtype=torch.int)
        if mm_types is not None:
            types[: len(mm_types)] = torch.tensor(mm_types, dtype=torch.int)
        if grid is None:
            position_ids = text_positions(length)
        else:
            # transformers 5: without mm_token_type_ids get_rope_index cannot see the image and M-RoPE silently
            # degrades to 1-D positions.
            position_ids, _ = self._rope.get_rope_index(ids[None], mm_token_type_ids=types[None], image_grid_thw=grid)
            position_ids = position_ids[:, 0]
        return LayoutSample(ids, code_mask, code_ids, labels, types, position_ids)


def collate_padded(samples: Sequence[LayoutSample], pad_id: int) -> SequenceBatch:
    """Right-padded batch with a B x T attention mask (1 = real token)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    length = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    code_mask = torch.zeros(batch, length, dtype=torch.bool)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(3, batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = sample.input_ids
        code_mask[row, :n] = sample.code_mask
        labels[row, :n] = sample.labels
        position_ids[:, row, :n] = sample.position_ids
        attention_mask[row, :n] = 1
    return SequenceBatch(
        input_ids=input_ids,
        code_mask=code_mask,
        code_ids=torch.cat([s.code_ids for s in samples]),
        labels=labels,
        position_ids=position_ids,
        attention_mask=attention_mask,
        **_vision_inputs(samples),
        samples_per_row=[1] * batch,
    )


def collate_packed(samples: Sequence[LayoutSample], row_length: int, pad_id: int) -> SequenceBatch:
    """Samples packed in order into rows of ``row_length`` tokens, no attention mask.

    Each row's tail is one padding segment with its own positions (so it never attends to real tokens).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    rows: list[list[LayoutSample]] = [[]]
    used = 0
    for index, sample in enumerate(samples):
        n = len(sample.input_ids)
        if n > row_length:
            raise ValueError(f"sample {index} has {n} tokens, longer than row_length={row_length}")
        if used + n > row_length:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += n
    input_ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    code_mask = torch.zeros(len(rows), row_length, dtype=torch.bool)
    labels = torch.full((len(rows), row_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(4, len(rows), row_length, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            end = start + len(sample.input_ids)
            input_ids[r, start:end] = sample.input_ids
            code_mask[r, start:end] = sample.code_mask
            labels[r, start:end] = sample.labels
            position_ids[0, r, start:end] = torch.arange(end - start)
            position_ids[1:, r, start:end] = sample.position_ids
            start = end
        position_ids[:, r, start:] = torch.arange(row_length - start)
    ordered = [s for row in rows for s in row]
    return SequenceBatch(
        input_ids=input_ids,
        code_mask=code_mask,
        code_ids=torch.cat([s.code_ids for s in ordered]),
        labels=labels,
        position_ids=position_ids,
        attention_mask=None,
        **_vision_inputs(ordered),
        samples_per_row=[len(row) for row in rows],
    )


def _vision_inputs(samples: Sequence[LayoutSample]) -> dict[str, torch.Tensor | None]:
    with_vit = [s for s in samples if s.image_grid_thw is not None]
    if not with_vit:
        return {"pixel_values": None, "image_grid_thw": None}
    if any(s.pixel_values is None for s in with_vit):
        raise ValueError("a sample has <|image_pad|> positions but no pixel_values")
    return {
        "pixel_values": torch.cat([s.pixel_values for s in with_vit]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in with_vit]),
    }


def _flat_codes(codes: torch.Tensor) -> torch.Tensor:
    codes = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
    if codes.numel() < 1:
        raise ValueError("an image needs at least one code")
    return codes


def _find_after(ids: Sequence[int], pattern: Sequence[int]) -> int:
    """Index right after the first occurrence of ``pattern`` in ``ids``."""
    n = len(pattern)
    for start in range(len(ids) - n + 1):
        if tuple(ids[start : start + n]) == tuple(pattern):
            return start + n
    raise ValueError(f"user header tokens {list(pattern)} not found in the chat-templated prompt")
