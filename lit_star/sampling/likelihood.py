"""Teacher-forced likelihood of image codes under a stage 2 model (diagnostics that score, not sample)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lit_star.models.sequence_layout import IGNORE_INDEX, collate_padded
from lit_star.sampling.modes import Star


@torch.no_grad()
def per_code_losses(star: Star, captions: Sequence[str], codes: torch.Tensor, unconditional: bool) -> torch.Tensor:
    """B x (h*w) teacher-forced cross-entropy of every code, with the training layout."""
    layout, model = star.layout, star.model
    batch = collate_padded(
        [layout.text_to_image(c, x, unconditional=unconditional) for c, x in zip(captions, codes)], layout.special.pad
    ).to(star.device)
    embeds = model.embed_inputs(batch.input_ids, batch.code_mask, star.codebook(batch.code_ids))
    hidden = model(embeds.to(model.base.dtype), batch.position_ids, batch.attention_mask)
    rows = []
    for states, labels in zip(hidden, batch.labels):  # one row's logits at a time: B x T x K would be large
        coded = labels != IGNORE_INDEX
        rows.append(F.cross_entropy(model.logits(states[coded]).float(), labels[coded], reduction="none"))
    return torch.stack(rows).cpu()
