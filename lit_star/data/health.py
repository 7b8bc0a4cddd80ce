"""Bad-sample accounting: skipped samples are counted in the loader workers and judged in the main process.

Each worker keeps a `SkipLedger`; every batch it emits carries the ledger's counts since the previous
batch under ``batch["data_health"]`` (so the counts survive the worker process boundary), and the
`DataHealthMonitor` callback sums them, logs ``data/skipped`` and ``data/skipped_fraction`` and stops
the run once the skipped fraction passes ``max_skip_fraction``, naming the shard, key and reason of
the most recent skips. Add it to a recipe's trainer callbacks::

    trainer:
      callbacks:
        - class_path: lit_star.data.health.DataHealthMonitor
          init_args: {min_seen: 200}
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Mapping

import lightning.pytorch as pl

DATA_HEALTH_KEY = "data_health"
RECENT_SKIPS_KEPT = 5
DEFAULT_MAX_SKIP_FRACTION = 0.01


class DataHealthError(RuntimeError):
    """Too many samples were unreadable: the data, not the model, needs fixing."""


def describe_skip(shard: str, key: str, reason: str) -> str:
    return f"shard={shard} key={key or '?'} reason={reason}"


_SKIP_DETAILS = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


def skip_kind(reason: str) -> str:
    """What sort of skip ``reason`` is: its text before the first colon, with quoted names and numbers
    masked ("corrupt image '…'", "missing key '…' (sample has", "unreadable tar at member '…'")."""
    return _SKIP_DETAILS.sub("…", reason.split(":", 1)[0]).strip()


def combine_reports(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Two consecutive `SkipLedger.drain` reports as one."""
    recent = [*first["recent_skips"], *second["recent_skips"]][-RECENT_SKIPS_KEPT:]
    return {
        "seen": first["seen"] + second["seen"],
        "skipped": first["skipped"] + second["skipped"],
        "last_skip": recent[-1] if recent else "",
        "recent_skips": recent,
        "first_skips": {**second["first_skips"], **first["first_skips"]},
    }


class SkipLedger:
    """Per-worker tally of samples read and skipped since the last batch was emitted."""

    def __init__(self) -> None:
        self.seen = 0
        self.skipped = 0
        self.recent: deque[str] = deque(maxlen=RECENT_SKIPS_KEPT)
        self.first_of_kind: dict[str, str] = {}

    def count_seen(self, n: int = 1) -> None:
        self.seen += n

    def skip(self, shard: str, key: str, reason: str) -> None:
        """Record one unusable sample; it counts as seen too, so skipped/seen is the loss rate."""
        self.seen += 1
        self.skipped += 1
        description = describe_skip(shard, key, reason)
        self.recent.append(description)
        self.first_of_kind.setdefault(skip_kind(reason), description)

    @property
    def pending(self) -> bool:
        return self.seen > 0

    def drain(self) -> dict[str, Any]:
        """Counts since the previous drain, in README.md's batch format, then reset."""
        recent = list(self.recent)
        report = {
            "seen": self.seen,
            "skipped": self.skipped,
            "last_skip": recent[-1] if recent else "",
            "recent_skips": recent,
            "first_skips": dict(self.first_of_kind),
        }
        self.seen = 0
        self.skipped = 0
        self.recent.clear()
        self.first_of_kind.clear()
        return report


def strip_data_health(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without its bookkeeping entry, for modules that iterate over every batch field."""
    return {name: value for name, value in batch.items() if name != DATA_HEALTH_KEY}


class DataHealthMonitor(pl.Callback):
    """Sums the per-batch skip counts, logs them, and raises `DataHealthError` past the allowed fraction.

    Args:
        max_skip_fraction: allowed skipped/seen ratio. ``None`` takes the datamodule's own
            ``max_skip_fraction`` (every lit_star DataModule has one), else 0.01.
        min_seen: no verdict during the run before this many samples, so one early bad sample cannot stop
            it. When fitting ends the verdict is given whatever the count: a short run over bad data fails
            (after its last checkpoint is written) instead of ending quietly.

    The error names the first skip of each kind (`skip_kind`) and the most recent ones.
    Counts are per process: under DDP every rank judges the samples its own loader read, and the
    logged values are rank 0's.
    """

    def __init__(self, max_skip_fraction: float | None = None, min_seen: int = 200) -> None:
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if min_seen < 1:
            raise ValueError(f"min_seen must be >= 1, got {min_seen}")
        self.max_skip_fraction = max_skip_fraction
        self.min_seen = min_seen
        self.seen = 0
        self.skipped = 0
        self.recent_skips: deque[str] = deque(maxlen=RECENT_SKIPS_KEPT)
        self.first_skips: dict[str, str] = {}

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def allowed_fraction(self, trainer: pl.Trainer | None) -> float:
        if self.max_skip_fraction is not None:
            return self.max_skip_fraction
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return float(getattr(datamodule, "max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION))

    def update(self, batch: Any, allowed_fraction: float) -> None:
        """Add one batch's counts and raise if the run's skipped fraction is past `allowed_fraction`."""
        if not isinstance(batch, Mapping) or DATA_HEALTH_KEY not in batch:
            return
        health = batch[DATA_HEALTH_KEY]
        self.seen += int(health["seen"])
        self.skipped += int(health["skipped"])
        if health["skipped"]:
            # "recent_skips" and "first_skips" are ours; producers that only follow README.md's batch format give "last_skip".
            self.recent_skips.extend(health.get("recent_skips") or [health["last_skip"]])
            for kind, description in (health.get("first_skips") or {}).items():
                self.first_skips.setdefault(kind, description)
        if self.seen >= self.min_seen:
            self.judge(allowed_fraction)

    def judge(self, allowed_fraction: float, when: str = "") -> None:
        """Raise `DataHealthError` if the skipped fraction so far is past `allowed_fraction`."""
        if self.skipped_fraction <= allowed_fraction:
            return
        first = "\n  ".join(self.first_skips.values())
        recent = "\n  ".join(self.recent_skips)
        raise DataHealthError(
            f"{self.skipped} of {self.seen} samples were skipped ({self.skipped_fraction:.2%}){when}, more than "
            f"max_skip_fraction={allowed_fraction:.2%}.\nFirst skip of each kind:\n  {first}\n"
            f"Most recent skips:\n  {recent}\n"
            "Fix or drop these shards, or raise max_skip_fraction if the loss is acceptable."
        )

    def _account(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, log: bool) -> None:
        self.update(batch, self.allowed_fraction(trainer))
        if log:
            pl_module.log("data/skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
            pl_module.log(
                "data/skipped_fraction", self.skipped_fraction, on_step=True, on_epoch=False, batch_size=1
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._account(trainer, pl_module, batch, log=True)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._account(trainer, pl_module, batch, log=False)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._account(trainer, pl_module, batch, log=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        # After the last checkpoint: a run too short for min_seen still gets its verdict.
        if self.seen < self.min_seen:
            self.judge(self.allowed_fraction(trainer), when=f" by the end of the run (fewer than min_seen={self.min_seen})")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "recent_skips": list(self.recent_skips),
                "first_skips": dict(self.first_skips)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen = int(state_dict["seen"])
        self.skipped = int(state_dict["skipped"])
        self.recent_skips.clear()
        self.recent_skips.extend(state_dict["recent_skips"])
        self.first_skips = dict(state_dict.get("first_skips", {}))
