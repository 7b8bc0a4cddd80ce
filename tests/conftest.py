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


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SMOKE_RECIPES = [str(REPO / "recipes/shapes/curriculum.yaml"), str(REPO / "recipes/shapes/curriculum_smoke.yaml")]


@pytest.fixture(scope="session")
def smoke_curriculum(tmp_path_factory):
    """The smoke curriculum (tiny world, every stage, ~90 s on 2 cores), run once per test session and shared
    by the slow tests that need real outputs: the curriculum's own checks, the notebook that explores such a
    run, and the end-to-end sweep. Returns (run directory, the finished process)."""
    import subprocess

    run = tmp_path_factory.mktemp("smoke_curriculum") / "run"
    command = [sys.executable, "-m", "lit_star", "curriculum", SMOKE_RECIPES[0], "--overlays", f"[{SMOKE_RECIPES[1]}]",
               "--run_dir", str(run)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return run, first
