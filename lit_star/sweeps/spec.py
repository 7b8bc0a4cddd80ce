"""Sweep files: parsing, checking, expansion into runs, and run-directory names.

A sweep file (``recipes/sweeps/*.yaml``) names the base ``configs`` of ``python -m lit_star fit``, a
``grid`` (the product of its axes) and/or a list of ``points``, the ``seeds``, the ``evals`` to run after
each fit and the ``metrics`` to collect. Every (point, seed) pair is one *run*, trained in its own
directory ``<sweep dir>/<point name>/seed<S>`` (``trainer.default_root_dir``). A point may also list
``stages``: earlier fits of its own (a curriculum's stages), run in order before its fit, each in
``<run dir>/<stage name>``. See docs/sweeps.md.

Interpolation: the file is resolved with OmegaConf once per run, with ``${run_dir}``, ``${seed}``,
``${point}`` and ``${sweep_dir}`` defined (and ``${oc.env:VAR,default}``), so an eval's argv can name its
run's checkpoint. A ``${...}`` meant for LightningCLI itself (a reference between recipe keys) is written
``\\${...}`` in the sweep file and reaches ``fit`` unresolved.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TOP_LEVEL_KEYS = {"name", "description", "sweep_dir", "runs_dir", "configs", "overrides", "env", "grid", "points", "seeds",
                  "evals", "metrics", "baseline", "local", "slurm"}
POINT_KEYS = {"name", "configs", "overrides", "stages"}
STAGE_KEYS = {"name", "configs", "overrides"}
EVAL_KEYS = {"name", "argv", "output"}
METRIC_KEYS = {"tensorboard", "dir", "json", "key", "reduce", "step", "label"}
LOCAL_KEYS = {"threads", "gpus", "gpus_per_run", "timeout_min"}
SLURM_KEYS = {"partition", "gpus_per_node", "nodes", "time", "cpus_per_task", "mem", "account", "qos",
              "constraint", "setup", "additional_parameters", "job_name"}
REDUCTIONS = ("last", "min", "max", "mean")
# Variables every run defines for interpolation in the sweep file.
RUN_VARIABLES = ("run_dir", "seed", "point", "sweep_dir")
MAX_NAME = 96


class SweepError(ValueError):
    """A sweep file that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Stage:
    """An earlier training stage of a point: a fit of its own (its configs and overrides only, not the sweep's),
    run before the point's fit in ``<run_dir>/<name>``, where the point's overrides can find its checkpoint."""

    name: str
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Point:
    """One setting of the swept knobs: extra config files and CLI overrides (``key: value``), and the stages
    trained before its fit (none for most points)."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()
    # axis -> value label, for tables and plots (a grid point's coordinates; empty for an explicit point)
    axes: tuple[tuple[str, Any], ...] = ()
    stages: tuple[Stage, ...] = ()


@dataclass
class Run:
    """One (point, seed): its directory and the commands it runs there."""

    point: str
    seed: int
    run_dir: str
    fit_argv: list[str]                      # after `python -m lit_star`
    evals: list[dict] = field(default_factory=list)  # {name, argv, output}
    env: dict[str, str] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)  # {name, fit_argv, run_dir}, run in order before fit_argv

    def to_dict(self) -> dict:
        return {"point": self.point, "seed": self.seed, "run_dir": self.run_dir, "fit_argv": self.fit_argv,
                "evals": self.evals, "env": self.env, "axes": self.axes, "stages": self.stages}

    @classmethod
    def from_dict(cls, data: dict) -> "Run":
        return cls(**data)


@dataclass
class Sweep:
    path: str
    raw: DictConfig          # the file(s) merged, unresolved
    name: str
    points: list[Point]
    seeds: list[int]
    axes: list[str]          # grid axes, in file order

    def context(self) -> str:
        return f"sweep file {self.path}"


def _fail(path: str, message: str) -> SweepError:
    return SweepError(f"{path}: {message}")


def load_sweep(paths: str | list[str], overrides: dict[str, Any] | None = None) -> Sweep:
    """Load and check one sweep file (or several, merged in order), before anything is launched."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    label = " + ".join(str(p) for p in paths)
    configs = []
    for path in paths:
        if not Path(path).is_file():
            raise SweepError(f"sweep file not found: {path}")
        try:
            configs.append(OmegaConf.load(path))
        except Exception as err:  # yaml errors carry the line
            raise SweepError(f"{path}: not valid YAML: {err}") from err
    raw = OmegaConf.merge(*configs)
    if overrides:
        raw = OmegaConf.merge(raw, OmegaConf.create(overrides))
    if not isinstance(raw, DictConfig):
        raise _fail(label, "a sweep file is a mapping")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise _fail(label, f"unknown top-level key(s) {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}")
    for key in ("configs", "seeds"):
        if key not in raw:
            raise _fail(label, f"lacks the key {key!r}")
    if "grid" not in raw and "points" not in raw:
        raise _fail(label, "needs a 'grid' and/or a list of 'points'")
    name = str(raw.get("name") or Path(paths[-1]).stem)

    seeds = _plain(raw.seeds)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(label, f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _fail(label, f"seeds repeat: {seeds}")

    points, axes = _expand_points(raw, label)
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(label, f"two points get the same directory name {dupes}; give explicit points a 'name'")

    for index, step in enumerate(_plain(raw.get("evals", [])) or []):
        where = f"evals[{index}]"
        if not isinstance(step, dict):
            raise _fail(label, f"{where} must be a mapping with name and argv")
        bad = sorted(set(step) - EVAL_KEYS)
        if bad:
            raise _fail(label, f"{where}: unknown key(s) {bad}; allowed: {sorted(EVAL_KEYS)}")
        if "name" not in step or "argv" not in step:
            raise _fail(label, f"{where} needs 'name' and 'argv'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(step["name"])):
            raise _fail(label, f"{where}: name {step['name']!r} must be letters, digits, '_', '.' or '-'")
        if not isinstance(step["argv"], list) or not step["argv"]:
            raise _fail(label, f"{where} ({step['name']}): argv must be a non-empty list")
    eval_names = [str(s["name"]) for s in _plain(raw.get("evals", [])) or []]
    if len(set(eval_names)) != len(eval_names) or "fit" in eval_names:
        raise _fail(label, f"eval names must be unique and not 'fit': {eval_names}")
    for point in points:
        # one done-marker per step name in a run (launch.DONE), so a stage may not share an eval's name
        steps = [stage.name for stage in point.stages] + eval_names
        if len(set(steps)) != len(steps) or "fit" in steps:
            raise _fail(label, f"point {point.name!r}: stage and eval names must be unique and not 'fit': {steps}")

    for metric, spec in (_plain(raw.get("metrics", {})) or {}).items():
        where = f"metrics.{metric}"
        if not isinstance(spec, dict):
            raise _fail(label, f"{where} must be a mapping: {{tensorboard: TAG}} or {{json: FILE, key: a.b}}")
        bad = sorted(set(spec) - METRIC_KEYS)
        if bad:
            raise _fail(label, f"{where}: unknown key(s) {bad}; allowed: {sorted(METRIC_KEYS)}")
        if ("tensorboard" in spec) == ("json" in spec):
            raise _fail(label, f"{where} needs exactly one of 'tensorboard' (a scalar tag) or 'json' (a file)")
        if "json" in spec and "key" not in spec:
            raise _fail(label, f"{where}: a json metric needs 'key' (a dotted path in the file)")
        if spec.get("reduce", "last") not in REDUCTIONS:
            raise _fail(label, f"{where}: reduce must be one of {REDUCTIONS}, got {spec['reduce']!r}")
    for section, allowed in (("local", LOCAL_KEYS), ("slurm", SLURM_KEYS)):
        bad = sorted(set(raw.get(section, {}) or {}) - allowed)
        if bad:
            raise _fail(label, f"{section}: unknown key(s) {bad}; allowed: {sorted(allowed)}")

    sweep = Sweep(path=label, raw=raw, name=name, points=points, seeds=seeds, axes=axes)
    if "baseline" in raw:
        baseline_point(sweep)  # raises when it names no point
    return sweep


def _plain(node: Any) -> Any:
    """A node as plain Python, unresolved (interpolations stay strings)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _expand_points(raw: DictConfig, label: str) -> tuple[list[Point], list[str]]:
    points: list[Point] = []
    axes: list[str] = []
    grid = _plain(raw.get("grid"))
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise _fail(label, "grid must be a mapping of axis -> list of values")
        choices = []
        for axis, values in grid.items():
            if not isinstance(values, list) or not values:
                raise _fail(label, f"grid.{axis} must be a non-empty list of values")
            options = []
            for index, value in enumerate(values):
                if isinstance(value, dict):
                    # an option: a named bundle of config files and overrides (e.g. a recipe per value)
                    options.append(_option(value, f"grid.{axis}[{index}]", label))
                else:
                    _check_key(axis, f"grid.{axis}", label)
                    options.append((_label(value), (), ((axis, value),), ()))
            choices.append(options)
            axes.append(str(axis))
        for combination in itertools.product(*choices):
            configs = tuple(c for _, cfgs, _, _ in combination for c in cfgs)
            overrides = tuple(o for _, _, ovr, _ in combination for o in ovr)
            stages = tuple(s for _, _, _, stg in combination for s in stg)
            coordinates = tuple((axis, option[0]) for axis, option in zip(axes, combination))
            points.append(Point(point_name(coordinates), configs, overrides, coordinates, stages))
    explicit = _plain(raw.get("points"))
    if explicit is not None:
        if not isinstance(explicit, list):
            raise _fail(label, "points must be a list of {name, configs, overrides}")
        for index, value in enumerate(explicit):
            if not isinstance(value, dict):
                raise _fail(label, f"points[{index}] must be a mapping with configs and/or overrides")
            name, configs, overrides, stages = _option(value, f"points[{index}]", label)
            points.append(Point(name if "name" in value else point_name(overrides), configs, overrides, (), stages))
    return points, axes


def _option(value: dict, where: str, label: str
            ) -> tuple[str, tuple[str, ...], tuple[tuple[str, Any], ...], tuple[Stage, ...]]:
    bad = sorted(set(value) - POINT_KEYS)
    if bad:
        raise _fail(label, f"{where}: unknown key(s) {bad}; a point or option has {sorted(POINT_KEYS)}")
    configs, items = _configs_and_overrides(value, where, label)
    stages = _stages(value.get("stages"), where, label)
    if not configs and not items and not stages and "name" not in value:
        raise _fail(label, f"{where} sets nothing: give it configs and/or overrides (or a name: the base as it is)")
    name = str(value["name"]) if "name" in value else point_name(items or tuple(("config", Path(c).stem) for c in configs))
    if "name" in value and not re.fullmatch(r"[A-Za-z0-9_.=+,-]+", name):
        raise _fail(label, f"{where}: name {name!r} must be letters, digits and _ . = + , -")
    return name, configs, items, stages


def _configs_and_overrides(value: dict, where: str, label: str) -> tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]:
    configs = value.get("configs", []) or []
    if isinstance(configs, str):
        configs = [configs]
    overrides = value.get("overrides", {}) or {}
    if not isinstance(overrides, dict):
        raise _fail(label, f"{where}.overrides must be a mapping of dotted key -> value")
    for key in overrides:
        _check_key(key, f"{where}.overrides", label)
    return tuple(str(c) for c in configs), tuple((str(k), v) for k, v in overrides.items())


def _stages(value: Any, where: str, label: str) -> tuple[Stage, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(label, f"{where}.stages must be a list of {{name, configs, overrides}}")
    stages = []
    for index, stage in enumerate(value):
        at = f"{where}.stages[{index}]"
        if not isinstance(stage, dict):
            raise _fail(label, f"{at} must be a mapping with name, configs and overrides")
        bad = sorted(set(stage) - STAGE_KEYS)
        if bad:
            raise _fail(label, f"{at}: unknown key(s) {bad}; a stage has {sorted(STAGE_KEYS)}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(stage.get("name", ""))):
            raise _fail(label, f"{at} needs a name of letters, digits, '_', '.' or '-' (its folder in the run)")
        configs, overrides = _configs_and_overrides(stage, at, label)
        if not configs:
            # a stage is a fit of its own: the sweep's base configs are the point's fit's, not the stage's
            raise _fail(label, f"{at} ({stage['name']}) needs its own configs (recipe files)")
        stages.append(Stage(str(stage["name"]), configs, overrides))
    return tuple(stages)


def _check_key(key: Any, where: str, label: str) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise _fail(label, f"{where}: {key!r} is not a dotted config key such as model.init_args.num_stack_layers")


def _label(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value, sort_keys=True)


def _slug(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "_"


def point_name(assignments: tuple[tuple[str, Any], ...] | list) -> str:
    """The directory name of a point, from its own assignments only (``key=value`` joined by ``,``), so the
    same point always gets the same directory whatever else the sweep holds. A key is shortened to its
    last component unless two of the point's keys share it. Names longer than 96 characters keep a prefix
    and a hash of every assignment."""
    assignments = sorted((str(k), v) for k, v in assignments)
    if not assignments:
        return "base"
    lasts = [k.rsplit(".", 1)[-1] for k, _ in assignments]
    keys = [last if lasts.count(last) == 1 else key for (key, _), last in zip(assignments, lasts)]
    name = ",".join(f"{key}={_slug(value)}" for key, (_, value) in zip(keys, assignments))
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps(assignments, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def baseline_point(sweep: Sweep) -> Point | None:
    """The point named by ``baseline`` (a point name, or a mapping of axis -> value)."""
    if "baseline" not in sweep.raw:
        return None
    wanted = _plain(sweep.raw.baseline)
    for point in sweep.points:
        if isinstance(wanted, str) and point.name == wanted:
            return point
        if isinstance(wanted, dict) and wanted and all(
                dict(point.axes).get(k, dict(point.overrides).get(k, object())) == v for k, v in wanted.items()):
            return point
    raise _fail(sweep.path, f"baseline {wanted!r} names no point; points: {[p.name for p in sweep.points]}")


def _value_arg(value: Any) -> str:
    """A CLI value as LightningCLI parses it (YAML): scalars as text, lists and mappings as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def run_dir_of(sweep_dir: str | Path, point: str, seed: int) -> Path:
    return Path(sweep_dir) / point / f"seed{seed}"


def expand_runs(sweep: Sweep, sweep_dir: str | Path, extra_fit_args: list[str] | None = None,
                runs_dir: str | Path | None = None) -> list[Run]:
    """Every (point, seed) of the sweep, its ``fit`` argv and evals resolved (``${run_dir}`` etc.).

    Run directories are ``<runs_dir>/<point>/seed<S>``; ``runs_dir`` defaults to the sweep directory. Two
    sweeps that share a ``runs_dir`` share the runs of the points they have in common (same name, same
    arguments), so a point is trained once.

    Later wins: base ``configs``, then the point's ``configs``, then the sweep-wide ``overrides``, the point's
    overrides, ``--seed_everything`` and ``--trainer.default_root_dir`` (the run directory)."""
    sweep_dir = Path(sweep_dir)
    runs_root = Path(runs_dir) if runs_dir is not None else sweep_dir
    runs = []
    # Seed-major: every point's first seed runs before any second seed, so a sweep cut short still has
    # whole rows to compare.
    for seed in sweep.seeds:
        for point in sweep.points:
            run_dir = run_dir_of(runs_root, point.name, seed)
            resolved = resolve_for_run(sweep, run_dir=str(run_dir), seed=seed, point=point, sweep_dir=str(sweep_dir))
            argv = _fit_argv([*resolved["configs"], *resolved["point_configs"]],
                             {**resolved["overrides"], **resolved["point_overrides"]}, seed, run_dir, extra_fit_args)
            stages = [{"name": stage["name"], "run_dir": str(run_dir / stage["name"]),
                       "fit_argv": _fit_argv(stage["configs"], stage["overrides"], seed, run_dir / stage["name"],
                                             extra_fit_args)}
                      for stage in resolved["point_stages"]]
            evals = [{"name": str(e["name"]), "argv": [str(a) for a in e["argv"]],
                      **({"output": str(e["output"])} if e.get("output") else {})} for e in resolved["evals"]]
            env = {str(k): str(v) for k, v in resolved["env"].items()}
            runs.append(Run(point.name, seed, str(run_dir), argv, evals, env, dict(point.axes), stages))
    return runs


def _fit_argv(configs: list, overrides: dict, seed: int, root: Path, extra_fit_args: list[str] | None) -> list[str]:
    """A fit's argv: configs, then overrides, then the seed and the run directory, which always win."""
    argv = ["fit"]
    for config in configs:
        argv += ["--config", str(config)]
    for key, value in overrides.items():
        argv += [f"--{key}", _value_arg(value)]
    argv += ["--seed_everything", str(seed), "--trainer.default_root_dir", str(root)]
    return argv + list(extra_fit_args or [])


def resolve_for_run(sweep: Sweep, run_dir: str, seed: int, point: Point, sweep_dir: str) -> dict:
    """The parts of the sweep file one run needs, with ``${run_dir}``, ``${seed}``, ``${point}`` and
    ``${sweep_dir}`` resolved; a broken interpolation names its key."""
    raw = sweep.raw
    tree = OmegaConf.create({
        "run_dir": run_dir, "seed": seed, "point": point.name, "sweep_dir": sweep_dir,
        "configs": _plain(raw.get("configs", [])), "overrides": _plain(raw.get("overrides", {})) or {},
        "env": _plain(raw.get("env", {})) or {}, "evals": _plain(raw.get("evals", [])) or [],
        "point_configs": list(point.configs),
        "point_overrides": {k: v for k, v in point.overrides},
        "point_stages": [{"name": s.name, "configs": list(s.configs), "overrides": {k: v for k, v in s.overrides}}
                         for s in point.stages],
    })
    try:
        resolved = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as err:
        raise _fail(sweep.path, f"interpolation failed for point {point.name!r}, seed {seed}: "
                                f"{getattr(err, 'full_key', '')}: {err}") from err
    if not isinstance(resolved["configs"], list) or not resolved["configs"]:
        raise _fail(sweep.path, "configs must be a non-empty list of recipe files")
    return resolved


def check_files(runs: list[Run], sweep: Sweep) -> None:
    """Every ``--config`` file of every run's fit and stages exists (named in the error)."""
    for run in runs:
        for where, argv in [("", run.fit_argv), *((f", stage {s['name']!r}", s["fit_argv"]) for s in run.stages)]:
            for flag, value in zip(argv, argv[1:]):
                if flag == "--config" and not Path(value).is_file():
                    raise _fail(sweep.path, f"point {run.point!r}{where}: config file not found: {value}")
