"""One place that turns a stage 2 checkpoint into a :class:`~lit_star.sampling.modes.Star` ready to sample.

Accepted ``ckpt``:

- a ``save_stacked_ar`` directory (``stacked_ar.json`` + ``stacked_ar.safetensors``), e.g. the output of
  ``python -m lit_star import-reference`` for STAR-3B/7B; its VQ is ``vq`` (or the directory's ``vq/``);
- a Lightning ``.ckpt`` of :class:`~lit_star.modules.stacked_ar_module.StackedARModule`; base and VQ are
  re-read from the paths it recorded and must match the checksums it recorded;
- a stage 4 ``.ckpt`` (:class:`~lit_star.modules.unified_tune_module.UnifiedTuneModule`): its stack, the same way.

Both are read by :func:`lit_star.checkpoints.load_stage2`; this module adds the processor and layout.

The code grid follows from the image size the stack was trained at: given explicitly, or recorded
(``image_size`` in ``stacked_ar.json`` or the module's hyper-parameters, the datamodule's ``resolution``),
or 384 for an ``import-reference`` directory (the released models' VQ resolution).

An edit's source image reaches the ViT under the limits the checkpoint records (a stage 4 checkpoint's
``unified_tune_config.edit_vit_limits``, a stage 2 module's ``edit_vit_*`` hyper-parameters); a directory or a
checkpoint that records none gets the base's default, the reference's limits for a Qwen2.5-VL base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lit_star.checkpoints import load_stage2
from lit_star.models.base_vlm import load_processor
from lit_star.models.sequence_layout import SequenceLayout
from lit_star.sampling.modes import Star


def load_star(
    ckpt: str | Path,
    *,
    base: str | Path | None = None,
    vq: str | Path | None = None,
    vq_flavour: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    stack_dtype: torch.dtype | None = None,
) -> Star:
    """Load a stage 2 checkpoint (see the module docstring) with its VQ, processor and layout, in eval mode.

    Args:
        base: Qwen2.5-VL directory overriding the recorded one (its checksum must still match).
        vq: VQ checkpoint overriding the recorded/bundled one (``load_vq`` formats; ``vq_flavour`` for a
            reference ``VQ-Model.pt``).
        image_size: side of the generated images; overrides any recorded value. Without either, the
            returned ``Star`` can answer questions but raises on generation.
        stack_dtype: run the stack, adapter and pixel head in this dtype (they are stored in fp32, the
            training master weights; ``torch.bfloat16`` on GPUs). The base keeps its own dtype.
    """
    weights = load_stage2(ckpt, base=base, vq=vq, vq_flavour=vq_flavour)
    model, vq_model, base_path = weights.stacked_ar, weights.vq, weights.base_path
    size = image_size or weights.image_size
    processor = load_processor(base_path)
    model = model.to(device).eval()
    if stack_dtype is not None:
        for trainable in (model.stack, model.adapter, model.pixel_head):
            trainable.to(stack_dtype)
    vq_model = vq_model.to(device).eval()
    layout = SequenceLayout(processor.tokenizer, model.base.config)
    # an edit's source reaches the ViT under the limits the stack was trained with
    return Star(model=model, vq=vq_model, processor=processor, layout=layout,
                image_size=None if size is None else int(size), reasoning_suffix=weights.reasoning_suffix,
                edit_vit_limits=weights.edit_vit_limits)
