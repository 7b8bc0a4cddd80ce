"""Learning-rate schedules shared by the stages: a factor on the base LR per optimizer step.

Used through ``torch.optim.lr_scheduler.LambdaLR``, which multiplies every parameter group's own LR.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "annealing", "constant"]


def lr_multiplier(
    step: int,
    total_steps: int,
    schedule: Schedule = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    annealing_start_ratio: float = 0.005,
    annealing_hold_fraction: float = 0.3,
    annealing_end_ratio: float = 0.01,
) -> float:
    """Factor on the base learning rate after ``step`` optimizer steps.

    * ``cosine``: linear warm-up from 0, then cosine decay to ``min_lr_ratio`` at ``total_steps``.
    * ``annealing`` (FVQ "learning annealing"): linear warm-up from ``annealing_start_ratio`` to 1,
      constant until ``annealing_hold_fraction`` of training, then linear decay to ``annealing_end_ratio``.
    * ``constant``: linear warm-up from 0, then 1.
    """
    if schedule == "annealing":
        if step < warmup_steps:
            return annealing_start_ratio + (1.0 - annealing_start_ratio) * step / warmup_steps
        hold_until = max(warmup_steps, int(annealing_hold_fraction * total_steps))
        if step < hold_until:
            return 1.0
        progress = min(1.0, (step - hold_until) / max(1, total_steps - hold_until))
        return 1.0 + (annealing_end_ratio - 1.0) * progress
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'cosine', 'annealing' or 'constant', got {schedule!r}")


def check_global_batch_size(trainer, expected: int | None) -> None:
    """Refuse to fit unless data batch_size x processes x gradient accumulation equals ``expected`` (if set).

    A mixture (``lit_star.data.MixtureDataModule``) draws each batch whole from one component, so its components
    must share one batch_size: otherwise the global batch would change with the draw."""
    datamodule = getattr(trainer, "datamodule", None)
    if expected is None or datamodule is None:
        return
    components = getattr(datamodule, "components", None)
    if components is not None:
        sizes = {name: getattr(component, "batch_size", None) for name, component in components.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"global_batch_size {expected} needs one batch_size for every mixture component, got {sizes}; "
                "set data.init_args.components.<name>.init_args.batch_size alike")
        micro, where = next(iter(sizes.values())), "the mixture components' batch_size"
    else:
        micro, where = getattr(datamodule, "batch_size", None), "data.init_args.batch_size"
    if micro is None:
        return
    actual = micro * trainer.world_size * trainer.accumulate_grad_batches
    if actual != expected:
        raise ValueError(
            f"global batch {actual} = data batch_size {micro} x {trainer.world_size} processes x "
            f"accumulate_grad_batches {trainer.accumulate_grad_batches}, but global_batch_size is "
            f"{expected}; adjust trainer.accumulate_grad_batches or {where}"
        )
