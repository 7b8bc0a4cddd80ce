"""From a checked sweep file to run directories: expansion, the config check, the files ``run`` writes."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from lit_star.sweeps.launch import INDEX
from lit_star.sweeps.spec import Run, Sweep, SweepError, baseline_point, check_files, expand_runs


def default_sweep_dir(sweep: Sweep) -> str:
    return str(sweep.raw.get("sweep_dir") or f"runs/sweeps/{sweep.name}")


def prepare(sweep: Sweep, sweep_dir: str | Path, extra_fit_args: list[str] | None = None, check: bool = True,
            write: bool = True, log=print) -> list[Run]:
    """Expand the sweep, check every run's files and (``check``) its fit arguments with LightningCLI's parser,
    all before anything is launched; with ``write``, create each run directory with ``sweep/run.json`` and
    ``resolved_config.yaml`` (and one in each stage's folder), and the sweep directory's index (what
    ``collect`` and ``status`` read)."""
    runs_dir = sweep.raw.get("runs_dir")
    runs = expand_runs(sweep, sweep_dir, extra_fit_args, runs_dir=str(runs_dir) if runs_dir else None)
    check_files(runs, sweep)
    check_existing(runs, sweep)
    configs: dict[str, str] = {}
    if check:
        from lit_star.sweeps.check import resolved_fit_config

        for run in runs:
            for stage in run.stages:
                try:
                    configs[stage["run_dir"]] = resolved_fit_config(stage["fit_argv"], run.env)
                except ValueError as err:
                    raise SweepError(f"{sweep.path}: point {run.point!r} (seed {run.seed}), stage {stage['name']!r}: "
                                     f"fit rejects its arguments:\n{err}") from None
            try:
                configs[run.run_dir] = resolved_fit_config(run.fit_argv, run.env)
            except ValueError as err:
                raise SweepError(f"{sweep.path}: point {run.point!r} (seed {run.seed}): fit rejects its "
                                 f"arguments:\n{err}") from None
        log(f"[sweep] {len(runs)} run(s) of {len(sweep.points)} point(s) x {len(sweep.seeds)} seed(s): "
            "fit arguments checked")
    if write:
        write_index(sweep, sweep_dir, runs)
        for run in runs:
            meta = Path(run.run_dir) / "sweep"
            meta.mkdir(parents=True, exist_ok=True)
            (meta / "run.json").write_text(json.dumps(run.to_dict(), indent=2))
            # launch.fit_incomplete reads each fit's max_steps from the resolved_config.yaml in its folder
            for folder in [run.run_dir, *(stage["run_dir"] for stage in run.stages)]:
                if folder in configs:
                    Path(folder).mkdir(parents=True, exist_ok=True)
                    (Path(folder) / "resolved_config.yaml").write_text(configs[folder])
    return runs


def check_existing(runs: list[Run], sweep: Sweep) -> None:
    """A run directory made earlier with other fit arguments (an edited sweep file, another sweep sharing
    ``runs_dir``) would be skipped as done or resumed with the wrong settings: refuse, naming both. The
    stages count too: a changed stage would leave the fit after it starting from the old stage's weights."""
    for run in runs:
        path = Path(run.run_dir) / "sweep" / "run.json"
        if not path.is_file():
            continue
        recorded = json.loads(path.read_text())
        then = [("fit", recorded.get("fit_argv"))] + [(s["name"], s["fit_argv"]) for s in recorded.get("stages", [])]
        now = [("fit", run.fit_argv)] + [(s["name"], s["fit_argv"]) for s in run.stages]
        if then != now:
            def show(steps: list) -> str:
                return "; ".join(f"{name}: {' '.join(argv or [])}" for name, argv in steps)

            raise SweepError(f"{sweep.path}: point {run.point!r} seed {run.seed}: {run.run_dir} holds a run made "
                             f"with other fit arguments\n  then: {show(then)}\n  now:  "
                             f"{show(now)}\nuse another --out (or runs_dir), or delete that directory")


def write_index(sweep: Sweep, sweep_dir: str | Path, runs: list[Run]) -> Path:
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    baseline = baseline_point(sweep)
    raw = OmegaConf.to_container(sweep.raw, resolve=False)
    index = {
        "name": sweep.name,
        "description": raw.get("description"),
        "sweep_file": sweep.path,
        "axes": sweep.axes,
        "seeds": sweep.seeds,
        "baseline": baseline.name if baseline else None,
        "metrics": raw.get("metrics", {}) or {},
        "points": [{"name": p.name, "axes": dict(p.axes), "configs": list(p.configs),
                    "overrides": dict(p.overrides), "stages": [s.name for s in p.stages]} for p in sweep.points],
        "runs": [r.to_dict() for r in runs],
    }
    (sweep_dir / "sweep.yaml").write_text(OmegaConf.to_yaml(sweep.raw))
    path = sweep_dir / INDEX
    path.write_text(json.dumps(index, indent=2, default=str))
    return path
