"""Sweeps: run an ablation grid locally or on SLURM, see where it stands, gather its table and plots.

    python -m lit_star sweep run recipes/sweeps/shapes_smoke.yaml --max-parallel 2
    python -m lit_star sweep run recipes/sweeps/star3b_6b_depth.yaml --launcher slurm --dry-run
    python -m lit_star sweep status runs/sweeps/shapes_smoke
    python -m lit_star sweep collect runs/sweeps/shapes_smoke

The machinery is :mod:`lit_star.sweeps`; the file format is in docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from lit_star.commands._dispatch import dispatch

JOBS = {
    "run": ("Expand a sweep file, then launch its unfinished runs (local or SLURM), skipping finished ones.",
            "lit_star.commands.sweep:run_main"),
    "collect": ("Write results.csv, results.md, plots and a TensorBoard hparams view of a sweep directory.",
                "lit_star.commands.sweep:collect_main"),
    "status": ("Show which runs of a sweep directory are done, running or failed, with wall times.",
               "lit_star.commands.sweep:status_main"),
}


def main(argv: list[str]) -> int:
    return dispatch("sweep", JOBS, argv)


def _print(line: str) -> None:
    print(line, flush=True)


def run_main(argv: list[str]) -> int:
    """Run a sweep file's grid: every (point, seed) in its own run directory, resumably."""
    from lit_star.sweeps import launch
    from lit_star.sweeps.prepare import default_sweep_dir, prepare
    from lit_star.sweeps.spec import SweepError, load_sweep

    parser = argparse.ArgumentParser(prog="python -m lit_star sweep run", description=run_main.__doc__)
    parser.add_argument("files", nargs="+", help="sweep file(s) (recipes/sweeps/*.yaml); later files override")
    parser.add_argument("--out", help="sweep directory (default: the file's sweep_dir, else runs/sweeps/<name>)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--max-parallel", type=int, default=1,
                        help="runs at once (local: sharing --threads / the GPUs; slurm: the job array's limit)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each run's commands (and, for slurm, the sbatch script); write and launch nothing")
    parser.add_argument("--threads", type=int, help="local CPU thread budget (default: the file's local.threads, "
                                                     "else every core), split between the parallel runs")
    parser.add_argument("--gpus", help="local GPUs to use, e.g. 0,1,2,3 (default: the file's local.gpus)")
    parser.add_argument("--gpus-per-run", type=int, help="local GPUs per run (default: local.gpus_per_run, else 0)")
    parser.add_argument("--partition", help="SLURM partition (overrides slurm.partition)")
    parser.add_argument("--gpus-per-node", type=int, help="SLURM GPUs per node (overrides slurm.gpus_per_node)")
    parser.add_argument("--nodes", type=int, help="SLURM nodes per run (overrides slurm.nodes)")
    parser.add_argument("--time", type=int, help="SLURM time limit per job in minutes (overrides slurm.time)")
    parser.add_argument("--seeds", help="launch only these seeds now (comma-separated, from the file's seeds); "
                                         "the sweep directory still lists every run")
    parser.add_argument("--points", help="launch only these points now (comma-separated names)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip checking every run's fit arguments with LightningCLI's parser")
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error("--max-parallel must be at least 1")

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
        runs = prepare(sweep, sweep_dir, extra_fit_args=extra, check=not args.no_check, write=not args.dry_run,
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


def collect_main(argv: list[str]) -> int:
    """Gather a sweep directory into results.csv, results.md, runs.csv, plots/ and hparams/."""
    from lit_star.sweeps.collect import collect

    parser = argparse.ArgumentParser(prog="python -m lit_star sweep collect", description=collect_main.__doc__)
    parser.add_argument("sweep_dir")
    parser.add_argument("--no-hparams", action="store_true", help="skip the TensorBoard hparams view")
    args = parser.parse_args(argv)
    try:
        results = collect(args.sweep_dir, hparams_view=not args.no_hparams)
    except FileNotFoundError as err:
        print(f"sweep collect: {err}", file=sys.stderr)
        return 2
    print((results.sweep_dir / "results.md").read_text())
    print(f"[sweep] wrote {results.sweep_dir}/results.csv, results.md, runs.csv, plots/"
          + ("" if args.no_hparams else ", hparams/ (tensorboard --logdir ...)"))
    return 0


def status_main(argv: list[str]) -> int:
    """What each run of a sweep directory is doing: done, running, failed (with its log), pending."""
    from lit_star.sweeps.status import format_status, run_states

    parser = argparse.ArgumentParser(prog="python -m lit_star sweep status", description=status_main.__doc__)
    parser.add_argument("sweep_dir")
    args = parser.parse_args(argv)
    try:
        rows = run_states(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"sweep status: {err}", file=sys.stderr)
        return 2
    print(format_status(rows))
    return 0
