"""Sweeps: run an ablation grid locally or on SLURM, see where it stands, gather its table and plots.

    python -m lit_star sweep run recipes/sweeps/shapes_smoke.yaml --max_parallel 2
    python -m lit_star sweep run recipes/sweeps/star3b_6b_depth.yaml --launcher slurm --dry_run true
    python -m lit_star sweep status runs/sweeps/shapes_smoke
    python -m lit_star sweep collect runs/sweeps/shapes_smoke

The machinery is :mod:`lit_star.sweeps`; the file format is in docs/sweeps.md.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Literal

def _print(line: str) -> None:
    print(line, flush=True)


def run(
    file: str,
    overlays: list[str] = [],
    out: str | None = None,
    launcher: Literal["local", "slurm"] = "local",
    max_parallel: int = 1,
    dry_run: bool = False,
    threads: int | None = None,
    gpus: str | None = None,
    gpus_per_run: int | None = None,
    partition: str | None = None,
    gpus_per_node: int | None = None,
    nodes: int | None = None,
    time: int | None = None,
    seeds: str | None = None,
    points: str | None = None,
    check: bool = True,
) -> int:
    """Run a sweep file's grid: every (point, seed) in its own run directory, resumably.

    Args:
        file: the sweep file (positional), e.g. ``recipes/sweeps/shapes_smoke.yaml``.
        overlays: sweep files merged over it in order.
        out: sweep directory (default: the file's sweep_dir, else runs/sweeps/<name>).
        launcher: ``local`` (submitit's LocalExecutor) or ``slurm``.
        max_parallel: runs at once (local: sharing threads / the GPUs; slurm: the job array's limit).
        dry_run: print each run's commands (and, for slurm, the sbatch script); write and launch nothing.
        threads: local CPU thread budget (default: the file's local.threads, else every core), split between runs.
        gpus: local GPUs to use, e.g. ``0,1,2,3`` (default: the file's local.gpus).
        gpus_per_run: local GPUs per run (default: local.gpus_per_run, else 0).
        partition: SLURM partition (overrides slurm.partition).
        gpus_per_node: SLURM GPUs per node (overrides slurm.gpus_per_node).
        nodes: SLURM nodes per run (overrides slurm.nodes).
        time: SLURM time limit per job in minutes (overrides slurm.time).
        seeds: launch only these seeds now (comma-separated, from the file's seeds).
        points: launch only these points now (comma-separated names).
        check: check every run's fit arguments with LightningCLI's parser first.
    """
    from lit_star.sweeps import launch
    from lit_star.sweeps.prepare import default_sweep_dir, prepare
    from lit_star.sweeps.spec import SweepError, load_sweep

    args = SimpleNamespace(**{**locals(), "files": [file, *overlays]})
    if args.max_parallel < 1:
        print("sweep run: --max_parallel must be at least 1", file=sys.stderr)
        return 2

    overrides: dict = {}
    slurm_flags = {k: v for k, v in {"partition": args.partition, "gpus_per_node": args.gpus_per_node,
                                      "nodes": args.nodes, "time": args.time}.items() if v is not None}
    if slurm_flags:
        overrides["slurm"] = slurm_flags
    try:
        sweep = load_sweep(args.files, overrides)
        sweep_dir = args.out or default_sweep_dir(sweep)
        slurm_settings = dict(sweep.raw.get("slurm", {}) or {}) if args.launcher == "slurm" else {}
        extra = launch.slurm_fit_args(slurm_settings) if args.launcher == "slurm" else []
        runs = prepare(sweep, sweep_dir, extra_fit_args=extra, check=args.check, write=not args.dry_run,
                       log=_print)
        if args.seeds:
            wanted = [int(seed) for seed in args.seeds.split(",")]
            unknown = sorted(set(wanted) - set(sweep.seeds))
            if unknown:
                raise SweepError(f"--seeds {unknown} are not seeds of the sweep file: {sweep.seeds}")
            runs = [run for run in runs if run.seed in wanted]
        if args.points:
            wanted_points = args.points.split(",")
            unknown = sorted(set(wanted_points) - {p.name for p in sweep.points})
            if unknown:
                raise SweepError(f"--points {unknown} are not points of the sweep: {[p.name for p in sweep.points]}")
            runs = [run for run in runs if run.point in wanted_points]
    except (SweepError, FileNotFoundError, ValueError) as err:
        print(f"sweep run: {err}", file=sys.stderr)
        return 2

    local = dict(sweep.raw.get("local", {}) or {})
    threads = args.threads or local.get("threads") or os.cpu_count() or 1
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(local.get("gpus", []) or [])
    gpus_per_run = args.gpus_per_run if args.gpus_per_run is not None else int(local.get("gpus_per_run", 0) or 0)
    if gpus_per_run and not gpus:
        gpus = list(range(gpus_per_run * args.max_parallel))

    if args.launcher == "slurm":
        from lit_star.sweeps.launch import SUBMITIT_DIR

        params = launch.slurm_parameters(slurm_settings, len(runs), args.max_parallel if args.max_parallel > 1
                                         else None, f"sweep_{sweep.name}")
        if args.dry_run:
            todo = [r for r in runs if not launch.run_finished(r)]
            folder = os.path.join(sweep_dir, SUBMITIT_DIR, "%j")
            _print(f"# sbatch script for a job array of {len(todo)} run(s) (submitit; one array task per run):")
            _print(launch.sbatch_script({**params, "map_count": len(todo)}, folder))
            _print("\n# each array task runs, in its run directory:")
            for run in runs:
                _print(launch.describe(run))
            return 0
        try:
            launch.submit_slurm(runs, sweep_dir, params, log=_print)
        except RuntimeError as err:  # no srun / sbatch here
            print(f"sweep run: {err}", file=sys.stderr)
            return 2
        _print(f"[sweep] follow it with: python -m lit_star sweep status {sweep_dir}")
        return 0

    per_run = max(1, threads // args.max_parallel)
    if args.dry_run:
        for run in runs:
            _print(launch.describe(run, per_run))
        return 0
    results = launch.run_local(runs, sweep_dir, max_parallel=args.max_parallel, threads=threads, gpus=gpus,
                               gpus_per_run=gpus_per_run, timeout_min=float(local.get("timeout_min", 7 * 24 * 60)),
                               log=_print)
    failed = sorted(d for d, state in results.items() if state not in ("done", "running"))
    _print(f"[sweep] {sum(s == 'done' for s in results.values())} of {len(results)} run(s) done"
           + (f"; failed or interrupted: {', '.join(failed)} (see `sweep status {sweep_dir}`)" if failed else ""))
    _print(f"[sweep] gather them with: python -m lit_star sweep collect {sweep_dir}")
    return 1 if failed else 0


def collect(sweep_dir: str, hparams: bool = True) -> int:
    """Gather a sweep directory into results.csv, results.md, runs.csv, plots/ and hparams/.

    Args:
        sweep_dir: the sweep directory (positional).
        hparams: also write the TensorBoard hparams view.
    """
    from lit_star.sweeps.collect import collect as gather

    try:
        results = gather(sweep_dir, hparams_view=hparams)
    except FileNotFoundError as err:
        print(f"sweep collect: {err}", file=sys.stderr)
        return 2
    print((results.sweep_dir / "results.md").read_text())
    print(f"[sweep] wrote {results.sweep_dir}/results.csv, results.md, runs.csv, plots/"
          + (", hparams/ (tensorboard --logdir ...)" if hparams else ""))
    return 0


def status(sweep_dir: str) -> int:
    """What each run of a sweep directory is doing: done, running, failed (with its log), pending.

    Args:
        sweep_dir: the sweep directory (positional).
    """
    from lit_star.sweeps.status import format_status, run_states

    try:
        rows = run_states(sweep_dir)
    except FileNotFoundError as err:
        print(f"sweep status: {err}", file=sys.stderr)
        return 2
    print(format_status(rows))
    return 0
