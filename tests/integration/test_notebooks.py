"""Every notebook in notebooks/ runs (nbclient, a real kernel) against tiny or smoke outputs, so a notebook
that no longer runs fails CI. Notebooks are stored without outputs (checked here)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.sweep_fixtures import fabricated_sweep

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
# Each notebook and the test below that executes it.
EXECUTED_BY = {
    "ablations.ipynb": "test_ablations_notebook_runs_on_a_fabricated_sweep",
    "explore_shapes_curriculum.ipynb": "test_explore_notebook_runs_on_the_smoke_curriculum",
    # executed in tests/unit/test_eval_decoders.py, against a tiny trained stage 3 decoder
    "diffusion_decoder.ipynb": "unit/test_eval_decoders.py::test_eval_decoders_scores_every_decoder_and_category",
}


def execute(name: str, env: dict[str, str], timeout: int = 600) -> str:
    """Run every cell of ``notebooks/<name>`` from the repository root; returns the text it printed."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))


def test_every_notebook_has_a_test_that_executes_it():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXECUTED_BY)
    names = set(globals())
    for test in EXECUTED_BY.values():  # a test here, or "file::test" under tests/
        path, _, name = test.rpartition("::")
        assert name in (names if not path else (REPO / "tests" / path).read_text()), test


@pytest.mark.parametrize("name", sorted(EXECUTED_BY))
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: clear its outputs before committing"


def test_ablations_notebook_runs_on_a_fabricated_sweep(tmp_path):
    fabricated_sweep(tmp_path)
    printed = execute("ablations.ipynb", {"LIT_STAR_SWEEP": str(tmp_path / "sweep"), "MPLBACKEND": "Agg",
                                          "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert "fab: axes ['model.init_args.num_stack_layers'], seeds [0, 1, 2]" in printed
    assert "| num_stack_layers=1 | 1 | 3/3 | 1.1000 ± 0.1000 (3) |" in printed
    assert "num_stack_layers=1" in printed and "sign test p = 0.250" in printed
    assert "1 run(s) not done: [('num_stack_layers=2', 2, 'pending')]" in printed


@pytest.mark.slow
def test_explore_notebook_runs_on_the_smoke_curriculum(smoke_curriculum):
    run, _ = smoke_curriculum
    printed = execute("explore_shapes_curriculum.ipynb", {"LIT_STAR_RUN": str(run), "OMP_NUM_THREADS": "1",
                                                          "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"})
    assert "PSNR" in printed and "overall" in printed and "base:" in printed
