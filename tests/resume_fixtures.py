"""Kill -9 tests of exact resume: tiny stage configs, callbacks that hold a run where the test kills it,
and the comparison of two checkpoints.

Shared by tests/test_resume_kill.py and the processes it starts (``trainer.callbacks`` name these classes,
so ``tests/`` is on their PYTHONPATH).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HOLD_SECONDS = 600


def _hold(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(HOLD_SECONDS)


class HoldMidStep(Callback):
    """Holds the optimizer step that follows step ``after_step`` (whose checkpoint is written by then),
    gradients computed but not applied, until the test kills the process. A run that finds ``marker``
    (the resumed one) does not stop."""

    def __init__(self, after_step: int, marker: str) -> None:
        self.after_step, self.marker = after_step, marker

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.after_step and not Path(self.marker).exists():
            _hold(self.marker)


class _HoldWhenPickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        _hold(self.marker)
        raise AssertionError("the test should have killed this process")


class HoldDuringSave(Callback):
    """Holds the save at step ``at_step`` while ``torch.save`` writes the temporary file."""

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step, self.marker = at_step, marker

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.global_step == self.at_step and not Path(self.marker).exists():
            checkpoint["holds_while_pickled"] = _HoldWhenPickled(self.marker)


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def fit_command(*configs: str, extra: tuple[str, ...] = ()) -> list[str]:
    command = [sys.executable, "-m", "lit_star", "fit"]
    for config in configs:
        command += ["--config", config]
    return [*command, *extra]


def environment() -> dict[str, str]:
    # One thread per process and the same count in every run: float sums depend on it.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def run_to_end(command: list[str], log: Path, timeout: float = 300) -> None:
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{log.read_text()[-6000:]}"


def run_and_kill_at(command: list[str], marker: Path, log: Path, timeout: float = 300) -> None:
    """Start ``command``, wait until it writes ``marker`` (a hold callback), then SIGKILL its process group."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not marker.exists():
                if process.poll() is not None:
                    raise AssertionError(f"the run ended (rc {process.returncode}) before it was held:\n"
                                         f"{log.read_text()[-6000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"the run was not held within {timeout} s:\n{log.read_text()[-6000:]}")
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL


def _tensors(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor / number / array in a nested checkpoint entry, by path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _tensors(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _tensors(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def _compared(checkpoint: dict) -> dict:
    """Weights and buffers, optimizer and scheduler states, step and epoch, and the data-health counts.
    (Lightning's loop counters are left out: after an epoch of unknown length it keeps counting the
    resumed epoch's batches from the previous one's; docs/resume.md.)"""
    health = {name: state for name, state in checkpoint["callbacks"].items() if name.startswith("DataHealthMonitor")}
    entries = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch")
    return {**{entry: checkpoint[entry] for entry in entries}, "data_health": health}


def checkpoint_difference(first: dict, second: dict) -> float:
    """Max abs difference between two checkpoints' floating-point weights, buffers and optimizer states;
    raises if anything else compared (`_compared`: a key, a dtype, an integer buffer, a count) differs."""
    worst = 0.0
    first, second = _compared(first), _compared(second)
    for entry in first:
        a, b = _tensors(first[entry], entry), _tensors(second[entry], entry)
        assert a.keys() == b.keys(), f"{entry}: keys differ: {sorted(a.keys() ^ b.keys())[:10]}"
        for path, x in a.items():
            y = b[path]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape, path
                if x.is_floating_point():
                    worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
                else:
                    assert torch.equal(x, y), f"{path}: integer tensors differ"
            elif isinstance(x, np.ndarray):
                assert np.array_equal(x, y), path
            else:
                assert x == y or (x != x and y != y), f"{path}: {x!r} != {y!r}"
    return worst
