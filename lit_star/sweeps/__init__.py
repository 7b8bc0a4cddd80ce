"""Sweeps: one file per ablation table, run locally or on SLURM, resumed, and gathered into a table and plots.

    python -m lit_star sweep run recipes/sweeps/shapes_6b_depth.yaml --max_parallel 1
    python -m lit_star sweep status runs/sweeps/shapes_6b_depth
    python -m lit_star sweep collect runs/sweeps/shapes_6b_depth

Parts: :mod:`~lit_star.sweeps.spec` (the file, expansion, names), :mod:`~lit_star.sweeps.check` (fit
arguments through LightningCLI's parser), :mod:`~lit_star.sweeps.launch` (submitit, resume, failures),
:mod:`~lit_star.sweeps.collect` (metrics, tables, plots), :mod:`~lit_star.sweeps.status`. See docs/sweeps.md.
"""

from lit_star.sweeps.collect import Results, load_results, plot_metric
from lit_star.sweeps.collect import collect as collect_sweep
from lit_star.sweeps.spec import Point, Run, Sweep, SweepError, expand_runs, load_sweep, point_name

__all__ = ["Point", "Results", "Run", "Sweep", "SweepError", "collect_sweep", "expand_runs", "load_results", "load_sweep",
           "plot_metric", "point_name"]
