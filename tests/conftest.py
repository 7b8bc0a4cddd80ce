import os

# One thread per process: on 2 cores oversubscription makes steps ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _bare_sys_argv(monkeypatch):
    """LightningCLI(args=...) warns when pytest's own argv is present; tests pass args explicitly."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
