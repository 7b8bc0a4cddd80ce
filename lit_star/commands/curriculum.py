"""Run a multi-stage curriculum (the Shapes world end to end) with resumable steps.

    python -m lit_star curriculum recipes/shapes/curriculum.yaml
    python -m lit_star curriculum recipes/shapes/curriculum.yaml --overlays [recipes/shapes/curriculum_smoke.yaml] --run_dir /tmp/cur

A curriculum YAML has a ``run_dir``, a CPU thread budget ``threads`` and a mapping ``steps``. Each step is
one ``python -m lit_star ...`` invocation and the ``output`` it must leave: either a ``job`` (``"eval shapes"``)
with its ``config`` (the job's parameters as a mapping, written to ``<run_dir>/configs/<step>.yaml`` and passed
as ``--config``; an overlay can change one parameter), or an ``argv`` list (``fit`` steps), plus ``extra_args``.
A step starts once the earlier steps it names in ``after`` are done (default: the step before it) and
its ``threads`` (default: all of them) are free, so independent steps that use fewer threads than the
machine has run side by side. Each step gets ``OMP_NUM_THREADS`` = its threads and runs on a
pseudo-terminal (live progress bars); its output goes to ``<run_dir>/logs/<step>.log``, echoed to the
console when the step has the machine to itself. A step marked ``grow: true`` (a training run) also
takes the threads that no ready step needs, e.g. once the step beside it has finished, and gives them
back when a new step starts (see :mod:`lit_star.thread_budget`). Its thread count then changes at a step
set by the wall clock, and with it the last bits of its float sums; a step marked ``grow_at_step: K``
instead runs on its own threads up to training step K and on the spare ones from step K on, waiting at
K for them if it must, and keeps them to its end, so reruns stay bit-identical.

A finished step is marked in ``<run_dir>/done/<step>`` and skipped next time, so rerunning the same
command resumes; a step that was interrupted is rerun, with ``resume_args`` appended when its
``resume_when`` path exists (``--ckpt_path last`` for training). Several YAML files merge in order
(OmegaConf) and ``${run_dir}``-style interpolations resolve after merging. ``env`` entries are exported
to every step (the Shapes recipes take their world and run directories from ``SHAPES_WORLD`` /
``SHAPES_RUNS``). Wall times go to ``<run_dir>/timings.json`` and the report.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from lit_star.sweeps.collect import read_metric
from lit_star.thread_budget import GROW_AT_STEP_ENV, THREADS_FILE_ENV, write_thread_budget


def load_curriculum(paths: list[str], run_dir: str | None = None) -> DictConfig:
    configs = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"curriculum file not found: {path}")
        configs.append(OmegaConf.load(path))
    config = OmegaConf.merge(*configs)
    if run_dir is not None:
        config.run_dir = run_dir
    for key in ("run_dir", "steps"):
        if key not in config:
            raise KeyError(f"curriculum config lacks the top-level key {key!r} (files: {paths})")
    total_threads = int(config.get("threads", os.cpu_count() or 1))
    earlier: list[str] = []
    for name, step in config.steps.items():
        if "output" not in step:
            raise KeyError(f"curriculum step {name!r} lacks 'output'")
        if ("argv" in step) == ("job" in step):
            raise KeyError(f"curriculum step {name!r} needs either 'argv' or 'job' (with its 'config'), not both")
        if "job" in step:
            _check_job(name, str(step.job))
        for needed in step_dependencies(config, name):
            if needed not in earlier:
                where = "is not a step" if needed not in config.steps else "comes later in the file"
                raise KeyError(f"curriculum step {name!r} runs after {needed!r}, which {where}; "
                               f"`after` may name only earlier steps: {earlier}")
        threads = step.get("threads")
        if threads is not None and not 1 <= int(threads) <= total_threads:
            raise ValueError(f"curriculum step {name!r} asks for {threads} threads; the curriculum has "
                             f"threads: {total_threads}")
        if not isinstance(step.get("grow", False), bool):
            raise ValueError(f"curriculum step {name!r}: grow must be true or false, got {step.grow!r}")
        grow_at_step = step.get("grow_at_step")
        if grow_at_step is not None:
            if step.get("grow", False):
                raise ValueError(f"curriculum step {name!r}: set grow or grow_at_step, not both")
            if isinstance(grow_at_step, bool) or not isinstance(grow_at_step, int) or grow_at_step < 0:
                raise ValueError(f"curriculum step {name!r}: grow_at_step must be a training step (an integer "
                                 f">= 0), got {grow_at_step!r}")
        earlier.append(name)
    OmegaConf.resolve(config)
    return config


def _check_job(step: str, job: str) -> None:
    """A step's ``job`` must name a job of ``python -m lit_star`` (checked before any step runs)."""
    from lit_star.commands import resolve

    try:
        resolve(job.split())
    except LookupError as err:
        raise KeyError(f"curriculum step {step!r}: job {job!r} is not a lit_star job\n{err.args[0]}") from None


def step_arguments(config: DictConfig, name: str) -> list[str]:
    """The ``python -m lit_star`` arguments of step ``name``; a ``job`` step's config is written first."""
    step = config.steps[name]
    if "job" not in step:
        return [str(a) for a in [*step.argv, *step.get("extra_args", [])]]
    config_path = Path(config.run_dir) / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(step.get("config", {}), config_path)
    return [*str(step.job).split(), "--config", str(config_path), *[str(a) for a in step.get("extra_args", [])]]


# Free space a full Shapes run needs (its run directory holds ~300 MB), with room for checkpoints of tuned recipes.
DEFAULT_MIN_FREE_GB = 2.0


# Where a fit recipe asks to compile the stack's layers (needs a C++ compiler).
COMPILE_KEYS = ("model.init_args.compile_layers", "model.init_args.stacked_ar.init_args.compile_layers")


def _fit_option(argv: list[str], key: str):
    """The value ``key`` (dotted, e.g. ``model.init_args.compile_layers``) takes in a ``fit`` step's
    arguments: its ``--config`` files merged in order, then ``--key value`` / ``--key=value`` overrides, as
    LightningCLI reads them (without building anything). None when nothing sets it. A config file that is
    missing or is not YAML raises ``ValueError`` naming it."""
    value = None
    index = 0
    while index < len(argv):
        argument = argv[index]
        name, _, inline = argument.partition("=")
        given = inline if "=" in argument else (argv[index + 1] if index + 1 < len(argv) else None)
        index += 1 if "=" in argument else 2
        if name == "--config" and given is not None:
            if not Path(given).is_file():
                raise ValueError(f"config file {given} does not exist")
            try:
                found = OmegaConf.select(OmegaConf.load(given), key, default=None)
            except Exception as error:  # yaml's and OmegaConf's parse errors share no base class
                raise ValueError(f"config file {given} does not parse: {error}") from None
            value = found if found is not None else value
        elif name == f"--{key}" and given is not None:
            value = yaml.safe_load(given)
        elif not name.startswith("--"):
            index -= 1  # a positional (the subcommand), not an option with a value
    return value


def _cuda_available() -> bool:
    import torch  # only for a step that asks for a GPU: the driver itself starts without torch

    return torch.cuda.is_available()


def preflight(config: DictConfig, steps: list[str], disk_usage=shutil.disk_usage,
              require_compile_toolchain=None, gpu_available=_cuda_available) -> None:
    """Check, before any step runs, what the ``steps`` about to run will need, and stop at once naming the
    fix: a writable run directory, ``min_free_gb`` (default :data:`DEFAULT_MIN_FREE_GB`) free on its disk,
    every ``fit`` step's config files present and parseable, a C++ compiler for any step that sets
    ``model.init_args.compile_layers`` (otherwise it fails inside inductor, after stages 0 and 1 ran), and a
    GPU for any step whose trainer asks for one."""
    problems = []
    run_dir = Path(config.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".preflight"
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as error:
        problems.append(f"run directory {run_dir} is not writable ({error}); pass --run_dir with a writable folder")
    else:
        free_gb = disk_usage(run_dir).free / 1e9
        need_gb = float(config.get("min_free_gb", DEFAULT_MIN_FREE_GB))
        if free_gb < need_gb:
            problems.append(f"only {free_gb:.1f} GB free under {run_dir}, the run needs {need_gb:g} GB; free some "
                            "space or pass --run_dir on another disk")
    for name in steps:
        step = config.steps[name]
        if "argv" not in step:
            continue  # a job step's config is the mapping load_curriculum already parsed
        argv = [str(a) for a in [*step.argv, *step.get("extra_args", [])]]
        try:
            # stage 2's own flag, or stage 4's stack (a StackedARModule nested in UnifiedTuneModule)
            compiled = next((key for key in COMPILE_KEYS if _fit_option(argv, key)), None)
            accelerator = _fit_option(argv, "trainer.accelerator")
        except ValueError as error:
            problems.append(f"step {name!r}: {error}")
            continue
        if accelerator in ("gpu", "cuda") and not gpu_available():
            problems.append(f"step {name!r}: trainer.accelerator is {accelerator!r} but torch sees no CUDA device; "
                            "run on a GPU machine, or drop the GPU overlay (trainer_recipe: recipes/trainer/cpu.yaml)")
        if compiled:
            if require_compile_toolchain is None:
                from lit_star.distributed.plans import require_compile_toolchain
            try:
                require_compile_toolchain(f"step {name!r}: {compiled}")
            except RuntimeError as error:
                problems.append(str(error))
    if problems:
        raise RuntimeError("curriculum preflight failed, nothing was run:\n  " + "\n  ".join(problems))


def step_dependencies(config: DictConfig, name: str) -> list[str]:
    """The steps ``name`` waits for: its ``after`` list, or else the step before it in the file."""
    step = config.steps[name]
    if "after" in step:
        return [str(n) for n in step.after]
    names = list(config.steps)
    index = names.index(name)
    return names[index - 1:index] if index else []


def startable_steps(config: DictConfig, pending: list[str], running, free: int) -> list[str]:
    """The pending steps to start now, given ``free`` threads: those whose ``after`` steps are neither
    pending nor ``running``, in file order. File order is priority: a ready step that does not fit blocks the
    later ones, so a long step is never starved by short ones behind it."""
    total_threads = int(config.get("threads", os.cpu_count() or 1))
    chosen: list[str] = []
    for name in pending:
        if any(d in pending or d in running for d in step_dependencies(config, name)):
            continue
        threads = int(config.steps[name].get("threads", total_threads))
        if threads > free:
            break
        chosen.append(name)
        free -= threads
    return chosen


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def remaining_estimate(config: DictConfig, pending: list[str], running: dict[str, float]) -> str:
    """"about N min left": the scheduler replayed on the recipe's recorded step times (``expected_seconds``,
    step -> seconds), ``running`` mapping each running step to the seconds it has run (a step past its
    recorded time is taken to end now). Steps with no recorded time count as 0 s, and are named."""
    expected = config.get("expected_seconds") or {}
    unknown = [n for n in [*running, *pending] if n not in expected]
    total_threads = int(config.get("threads", os.cpu_count() or 1))
    threads = {n: int(config.steps[n].get("threads", total_threads)) for n in [*running, *pending]}
    ends = {n: max(0.0, float(expected.get(n, 0.0)) - ran) for n, ran in running.items()}
    waiting, now = list(pending), 0.0
    while waiting or ends:
        free = total_threads - sum(threads[n] for n in ends)
        for name in startable_steps(config, waiting, ends, free):
            ends[name] = now + float(expected.get(name, 0.0))
            waiting.remove(name)
        if not ends:
            break  # cannot happen for a loaded curriculum; guards the loop
        now = min(ends.values())
        ends = {n: end for n, end in ends.items() if end > now}
    estimate = f"about {_minutes(now)} left (recorded step times)"
    if not expected:
        return "no estimate of the time left (the recipe records no expected_seconds)"
    return estimate + (f"; no recorded time for {', '.join(unknown)}" if unknown else "")


@dataclass
class _Running:
    process: subprocess.Popen
    threads: int  # what the step asked for
    started: float
    log_path: Path
    echo: bool
    copier: threading.Thread
    budget_path: Path
    granted: int  # what it may use now: more than `threads` while it holds spare cores
    most_granted: int
    keeps_grant: bool = False  # grow_at_step: spare threads, once granted, stay the step's to its end

    @property
    def held(self) -> int:
        """The threads no other step may start on."""
        return self.granted if self.keeps_grant else self.threads


def _grows(step) -> bool:
    return bool(step.get("grow", False)) or step.get("grow_at_step") is not None


def _grant_spare_threads(config: DictConfig, running: dict[str, _Running], total_threads: int, log) -> None:
    """Give the threads that the running steps do not hold to the first running step (file order) marked
    ``grow`` or ``grow_at_step``; every other step gets back to its own count, except that a
    ``grow_at_step`` step keeps what it was granted."""
    spare = total_threads - sum(r.held for r in running.values())
    for name in [n for n in config.steps if n in running]:
        run = running[name]
        granted = run.held
        if spare > 0 and _grows(config.steps[name]):
            granted, spare = granted + spare, 0
        if granted != run.granted:
            write_thread_budget(run.budget_path, granted)
            run.granted, run.most_granted = granted, max(run.most_granted, granted)
            log(f"[curriculum] {name}: now {granted} thread(s)")


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _launch(command: list[str], env: dict, log_path: Path, echo: bool) -> tuple[subprocess.Popen, threading.Thread]:
    """Start a step on a pseudo-terminal, so Lightning and tqdm draw live progress bars as they would in a
    console, and copy what it prints into its log (and to the console when ``echo``)."""
    master, child_end = pty.openpty()
    columns, rows = shutil.get_terminal_size((120, 40))
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=child_end, stderr=child_end)
    os.close(child_end)

    def copy() -> None:
        with open(log_path, "ab") as log:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the step exited and closed its end
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
        os.close(master)

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    return process, copier


def _tail(path: Path, lines: int = 20, window: int = 65536) -> str:
    """The last ``lines`` non-blank lines of a step's log, colour codes removed; a progress bar's redraws
    (carriage returns) count as lines, so ``lines=1`` is its latest state."""
    if not path.exists():
        return ""
    with open(path, "rb") as log:
        log.seek(max(0, path.stat().st_size - window))
        text = _ANSI.sub(b"", log.read()).decode(errors="replace")
    kept = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return "\n".join(kept[-lines:])


def busy_seconds(timings: dict[str, dict]) -> float:
    """Wall time during which at least one step ran: overlapping steps count once, and the idle time
    between two invocations (a resumed run) does not count."""
    spans = sorted((t["started_at"], t["started_at"] + t["seconds"]) for t in timings.values() if "started_at" in t)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    # Steps timed before start times were recorded ran one after another.
    return total + sum(t["seconds"] for t in timings.values() if "started_at" not in t)


def critical_path(timings: dict[str, dict], slack: float = 2.0) -> list[str]:
    """The chain of steps that set the wall time: from the step that ended last, back through the step that
    ended last before each one started (at most ``slack`` seconds before: the scheduler polls, and times are
    rounded to 0.1 s), whether it waited for that step's output or for its threads. Speeding up any other
    step does not shorten the run."""
    spans = {name: (t["started_at"], t["started_at"] + t["seconds"]) for name, t in timings.items() if "started_at" in t}
    if not spans:
        return []
    chain = [max(spans, key=lambda name: spans[name][1])]
    while True:
        start = spans[chain[-1]][0]
        before = [name for name, (_, end) in spans.items() if start - slack <= end <= start + 0.25 and name not in chain]
        if not before:
            return chain[::-1]
        chain.append(max(before, key=lambda name: spans[name][1]))


def _print_now(line: str) -> None:
    # Flushed at once: under nohup or a pipe stdout is block-buffered and the heartbeat would sit unseen.
    print(line, flush=True)


def run_curriculum(config: DictConfig, only: list[str] | None = None, log=_print_now,
                   command: tuple[str, ...] = (sys.executable, "-m", "lit_star"),
                   status_every: float = 60.0) -> dict[str, dict]:
    """Run the unfinished steps, each as soon as the steps it comes ``after`` are done and its ``threads``
    are free, so steps that cannot use every core (the one-thread evaluations) run side by side.

    Each step's output goes to ``<run_dir>/logs/<step>.log`` (and to the console when it runs alone);
    while steps run side by side, their latest progress lines are logged every ``status_every`` seconds.
    A failed step lets the steps already running finish, starts no new one, then raises.
    """
    run_dir = Path(config.run_dir)
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The Shapes recipes read their world and run roots from ${oc.env:...}; one place sets them.
    base_env.update({str(k): str(v) for k, v in config.get("env", {}).items()})
    total_threads = int(config.get("threads", os.cpu_count() or 1))

    def finished(name: str) -> bool:
        return (run_dir / "done" / name).exists() and Path(config.steps[name].output).exists()

    pending = []
    for name in config.steps:
        if only and name not in only:
            continue
        if finished(name):
            log(f"[curriculum] {name}: done already ({config.steps[name].output}), skipping")
        else:
            pending.append(name)
    for name in pending:
        missing = [d for d in step_dependencies(config, name) if d not in pending and not finished(d)]
        if missing:
            raise RuntimeError(f"curriculum step {name!r} needs {missing}, which are neither done nor selected")
    preflight(config, pending)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "timings.json"
    timings: dict[str, dict] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    run_started = time.time()
    total_steps, steps_done = len(pending), 0

    running: dict[str, _Running] = {}
    failures: list[str] = []
    last_status = time.time()
    while pending or running:
        free = total_threads - sum(r.held for r in running.values())
        for name in startable_steps(config, pending, running, free) if not failures else []:
            step = config.steps[name]
            threads = int(step.get("threads", total_threads))
            argv = step_arguments(config, name)
            if step.get("resume_when") and Path(step.resume_when).exists():
                argv += [str(a) for a in step.get("resume_args", [])]
            log_path = run_dir / "logs" / f"{name}.log"
            alone = not running and threads == total_threads
            log(f"[curriculum] {name}: python -m lit_star {' '.join(argv)}  ({threads} thread(s), log {log_path})")
            budget_path = run_dir / "threads" / name
            write_thread_budget(budget_path, threads)
            env = {**base_env, "OMP_NUM_THREADS": str(threads), THREADS_FILE_ENV: str(budget_path.resolve())}
            grow_at_step = step.get("grow_at_step")
            if grow_at_step is not None and threads >= total_threads:
                # e.g. a 1-thread override of the main recipe: nothing to grow into, so nothing to wait for.
                log(f"[curriculum] {name}: grow_at_step {grow_at_step} ignored, the step has all {total_threads} thread(s)")
                grow_at_step = None
            if grow_at_step is not None:
                env[GROW_AT_STEP_ENV] = str(grow_at_step)
            process, copier = _launch([*command, *argv], env, log_path, alone)
            running[name] = _Running(process, threads, time.time(), log_path, alone, copier, budget_path,
                                     threads, threads, keeps_grant=grow_at_step is not None)
            last_status = time.time()
            pending.remove(name)
        if not running:
            break
        _grant_spare_threads(config, running, total_threads, log)
        time.sleep(0.2)
        if not any(r.echo for r in running.values()) and time.time() - last_status >= status_every:
            last_status = time.time()
            log("[curriculum] running: " + " | ".join(
                f"{name} {(last_status - r.started) / 60:.1f} min: {_tail(r.log_path, 1)[:110]}" for name, r in running.items()))
        for name, run in list(running.items()):
            returncode = run.process.poll()
            if returncode is None:
                continue
            run.copier.join()
            del running[name]
            seconds = time.time() - run.started
            output = Path(config.steps[name].output)
            if returncode != 0 or not output.exists():
                why = f"exit code {returncode}" if returncode != 0 else f"no output {output}"
                failures.append(f"{name!r} ({why} after {seconds:.0f} s; last lines of {run.log_path}: "
                                f"{_tail(run.log_path)})")
                log(f"[curriculum] {name}: FAILED, {why}; see {run.log_path}")
                continue
            marker = run_dir / "done" / name
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{seconds:.1f}\n")
            timings[name] = {"seconds": round(seconds, 1), "started_at": round(run.started, 1), "threads": run.threads,
                             "argv": run.process.args[len(command):]}
            if run.most_granted > run.threads:
                timings[name]["grew_to"] = run.most_granted
                if run.keeps_grant:
                    timings[name]["grew_at_step"] = int(config.steps[name].grow_at_step)
            timings_path.write_text(json.dumps(timings, indent=2))
            steps_done += 1
            elapsed = time.time() - run_started
            log(f"[curriculum] {name}: finished in {seconds:.0f} s ({steps_done}/"
                f"{total_steps} steps done); elapsed {_minutes(elapsed)}, "
                + remaining_estimate(config, pending, {n: time.time() - r.started for n, r in running.items()}))
    if failures:
        raise RuntimeError("curriculum step(s) failed: " + "; ".join(failures))
    return timings


def curriculum(recipe: str, overlays: list[str] = [], run_dir: str | None = None, only: list[str] | None = None) -> int:
    """Run a curriculum YAML end to end, resuming finished steps; write ``<run_dir>/report.md``.

    Args:
        recipe: the curriculum YAML (positional), e.g. ``recipes/shapes/curriculum.yaml``.
        overlays: YAML files merged over it in order (OmegaConf, so a step can be changed in part),
            e.g. ``--overlays [recipes/shapes/curriculum_smoke.yaml]``.
        run_dir: override the ``run_dir`` of the YAML.
        only: run only these step names, e.g. ``--only [world,tokenize]``.
    """
    merged = load_curriculum([recipe, *overlays], run_dir)
    timings = run_curriculum(merged, only)
    report = write_report(merged, timings)
    _print_now(f"[curriculum] report: {report}")
    return 0


def _load_json(path: str | None) -> dict | None:
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return None


def _merged_shapes_results(paths) -> dict | None:
    """One ``eval shapes`` results dict from one path or a list of them (the sets split across processes);
    the processes must have sampled with the same settings."""
    if paths is None:
        return None
    merged: dict = {}
    for path in [paths] if isinstance(paths, str) else list(paths):
        results = _load_json(path)
        if results is None:
            continue
        if merged and results["sampler"] != merged["sampler"]:
            raise ValueError(f"{path} was sampled with {results['sampler']}, an earlier part with {merged['sampler']}")
        grids = merged.get("grids", []) + results.get("grids", [])
        merged = {**results, **merged, "grids": grids}
    return merged or None


def _score_table(results: dict[str, dict]) -> list[str]:
    """One markdown table: categories as rows, one column per scored set."""
    names = list(results)
    categories = sorted({c for r in results.values() for c in r["categories"]})
    lines = ["| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for category in [*categories, "overall"]:
        cells = []
        for result in results.values():
            value = result["overall"] if category == "overall" else result["categories"].get(category)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    errors = [r.get("overall_standard_error") for r in results.values()]  # absent from older results files
    lines.append("| overall, standard error | " + " | ".join("-" if e is None else f"{e:.3f}" for e in errors) + " |")
    return lines


def _objects_table(results: dict[str, dict]) -> list[str]:
    """Objects found per image, and for single_object and colors the "right colour, wrong shape" baseline
    (the share of the other shapes that would pass on the same images) beside the score, for the sets
    that record them."""
    sets = {name: r for name, r in results.items() if r.get("objects_per_image")}
    if not sets:
        return []
    header = "| category | " + " | ".join(f"{name}: score | objects per image | wrong-shape baseline" for name in sets) + " |"
    lines = ["", "Objects found per image, and the score a drawing of the right colour with a wrong shape gets on "
             "the one-object prompts (they accept extra objects, as GenEval does):", "", header,
             "|---" * (3 * len(sets) + 1) + "|"]
    categories = sorted({c for r in sets.values() for c in r["categories"]})
    for category in categories:
        cells = []
        for r in sets.values():
            score, objects = r["categories"].get(category), r["objects_per_image"].get(category)
            baseline = r.get("wrong_shape_baseline", {}).get(category)
            cells += ["-" if v is None else f"{v:.3f}" if i != 1 else f"{v:.2f}"
                      for i, v in enumerate((score, objects, baseline))]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines



def _score(result: dict | None) -> str:
    if not result:
        return "not measured"
    error = result.get("overall_standard_error")
    return f"{result['overall']:.3f}" + ("" if error is None else f" ± {error:.3f}")


def _claims_table(before: dict | None, after: dict | None, shapes: dict | None, stage4: dict | None = None,
                  after_stage4: dict | None = None) -> list[str]:
    """"What STAR claims → what this run measured", one row per claim the curriculum can test."""
    shapes, stage4 = shapes or {}, stage4 or {}
    if before and after:
        identical = before["answers"] == after["answers"]
        understanding = (f"every answer identical after stage 2: **{identical}** ({len(after['answers'])} answers; VQA "
                         f"{before['vqa_accuracy']:.3f} → {after['vqa_accuracy']:.3f})")
        if after_stage4:
            understanding += f"; after stage 4: **{before['answers'] == after_stage4['answers']}**"
    else:
        understanding = "not measured"
    seen = shapes.get("geneval_seen")
    draws = "not measured" if not seen else (
        f"seen pairs overall {_score(seen)}; single object {seen['categories'].get('single_object', float('nan')):.3f}")
    with_reasoning = shapes.get("knowledge_seen_with_reasoning")
    without = shapes.get("knowledge_seen_without_reasoning")
    if with_reasoning and without:
        lift = (f"{with_reasoning['overall'] / without['overall']:.1f}x" if without["overall"] > 0
                else "from 0")
        reasoning = (f"seen-pair riddles {with_reasoning['overall']:.3f} with reasoning, {without['overall']:.3f} "
                     f"without ({lift})")
    else:
        reasoning = "not measured"
    rows = [
        ("Understanding is untouched: the base VLM is frozen", understanding),
        ("The stack draws what it is told (seen colour/shape pairs)", draws),
        ("It composes: held-out colour/shape pairs", f"held-out pairs overall {_score(shapes.get('geneval'))}"
         if shapes.get("geneval") else "not measured"),
        ("Implicit reasoning: the base's answer lifts knowledge prompts", reasoning),
        *([("Stage 4 tunes stack and decoder together: edits, and a diffusion decoder",
            f"edit set overall {_score(stage4.get('edit'))}; seen pairs through the diffusion decoder "
            f"{_score(stage4.get('geneval_seen_diffusion'))}, through the VQ decoder {_score(stage4.get('geneval_seen'))}")]
          if stage4 else []),
        ("Stacked layers copied from the VLM beat a random init (Table 6c)",
         "not run by this curriculum: `python -m lit_star sweep run recipes/sweeps/shapes_6c_init.yaml`"),
    ]
    return ["## What STAR claims, what this run measured", "", "| claim | measured |", "|---|---|",
            *(f"| {claim} | {measured} |" for claim, measured in rows), ""]


def _vq_section(vq: dict | None) -> list[str]:
    """Stage 1 judged by what the stack needs: ShapesEval of the VQ's reconstructions (``eval shapes --vq``)."""
    if not vq:
        return []
    lines = ["", "## VQ (stage 1)", "",
             f"ShapesEval of the VQ's reconstructions of the eval ground truth (target ≥ {vq['target']} in every "
             f"category; lowest **{vq['lowest_category']:.3f}**, target {'met' if vq['meets_target'] else 'not met'}). "
             f"Beside it: PSNR {vq['psnr']:.2f} dB, codebook utilisation {vq['utilisation']:.4f}, "
             f"code perplexity {vq['perplexity']:.1f}.", ""]
    return lines + _score_table(vq["sets"])


def _stage2_loss_section(run: str | None) -> list[str]:
    """Stage 2's last validation loss with and without the prompt (the prompt's worth in nats per code)."""
    if not run:
        return []
    values = {tag: read_metric(run, {"tensorboard": tag}) for tag in
              ("val/loss", "val/loss_unconditional", "val/prompt_gain")}
    if values["val/loss"] is None:
        return []
    unconditional, gain = values["val/loss_unconditional"], values["val/prompt_gain"]
    return ["", "## Stage 2 validation loss", "", "| with the prompt | without the prompt | prompt gain |",
            "|---|---|---|",
            f"| {values['val/loss']:.4f} | {'-' if unconditional is None else f'{unconditional:.4f}'} | "
            f"{'-' if gain is None else f'{gain:.4f}'} |", "",
            "Cross-entropy per image code at the last validation; the gain is what the prompt is worth."]


def _stage4_section(stage4: dict | None, stage2_seen: dict | None, before: dict | None, after: dict | None) -> list[str]:
    """Stage 4 (``eval shapes`` on the stage 4 checkpoint): the seen-pair set drawn by the tuned stack and decoded
    by the VQ decoder and by the tuned diffusion decoder (the same samples), the edit set per category, and
    understanding after stage 4 against the stage 0 base."""
    if not stage4 and not after:
        return []
    lines = ["", "## Stage 4: stack and diffusion decoder tuned together", ""]
    if stage4:
        sets = {"stage 2 stack, VQ decoder": stage2_seen} if stage2_seen else {}
        for key, name in (("geneval_seen", "stage 4 stack, VQ decoder"),
                          ("geneval_seen_diffusion", "stage 4 stack, diffusion decoder")):
            if key in stage4:
                sets[name] = stage4[key]
        if sets:
            lines += ["Seen colour/shape pairs; both stage 4 columns score the same samples of the stack, decoded by "
                      "each decoder" + (f" ({stage4['per_category']} prompts per category)" if stage4.get("per_category")
                                        else "") + ".", "", *_score_table(sets), ""]
        if "edit" in stage4:
            lines += ["The ShapesEval edit set, every edit category (VQ decoder):", "",
                      *_score_table({"edits after stage 4": stage4["edit"]}), ""]
    if before and after:
        identical = before["answers"] == after["answers"]
        lines += [f"Understanding of the base inside the stage 4 model: VQA {after['vqa_accuracy']:.4f}, riddles "
                  f"{after['riddle_accuracy']:.4f}; every answer identical to the stage 0 base: **{identical}** "
                  f"({len(after['answers'])} answers).", ""]
    return lines


def write_report(config: DictConfig, timings: dict[str, dict]) -> Path:
    """``<run_dir>/report.md``: wall time per step and the critical path, understanding before/after, prompt
    binding, ShapesEval, grids."""
    run_dir = Path(config.run_dir)
    sources = config.get("report", {})
    before, after = _load_json(sources.get("understanding_before")), _load_json(sources.get("understanding_after"))
    shapes = _merged_shapes_results(sources.get("shapes_eval"))
    lines = ["# Shapes curriculum report", "", f"Run directory: `{run_dir}`", "",
             *_claims_table(before, after, shapes, _merged_shapes_results(sources.get("stage4_shapes_eval")),
                            _load_json(sources.get("understanding_after_stage4"))),
             "## Wall time per step", "",
             "| step | seconds | threads |", "|---|---|---|"]
    for name, timing in timings.items():
        grew = ""
        if "grew_at_step" in timing:
            grew = f", {timing['grew_to']} from training step {timing['grew_at_step']}"
        elif "grew_to" in timing:
            grew = f", {timing['grew_to']} once spare"
        lines.append(f"| {name} | {timing['seconds']:.0f} | {timing.get('threads', '-')}{grew} |")
    lines.append(f"| sum of steps | {sum(t['seconds'] for t in timings.values()):.0f} | |")
    lines.append(f"| **wall time** (steps that overlap count once) | **{busy_seconds(timings):.0f}** | |")
    path = critical_path(timings)
    if path:
        lines += ["", "Critical path (each step started as the one before it ended; only these set the wall time): "
                  + " → ".join(f"{name} {timings[name]['seconds']:.0f} s" for name in path)
                  + f" = {sum(timings[name]['seconds'] for name in path):.0f} s."]

    lines += _vq_section(_load_json(sources.get("vq")))
    lines += _stage2_loss_section(sources.get("stage2_run"))
    if before and after:
        identical = before["answers"] == after["answers"]
        lines += ["", "## Understanding before and after stage 2", "",
                  "| | VQA accuracy | riddle accuracy |", "|---|---|---|",
                  f"| stage 0 base | {before['vqa_accuracy']:.4f} | {before['riddle_accuracy']:.4f} |",
                  f"| base inside stage 2 | {after['vqa_accuracy']:.4f} | {after['riddle_accuracy']:.4f} |", "",
                  f"Every answer identical: **{identical}** ({len(after['answers'])} answers compared).", "",
                  "Stage 0 base by question type: "
                  + ", ".join(f"{q} {v:.2f}" for q, v in before["vqa_accuracy_by_type"].items()) + "."]
        parts = before.get("descriptions")  # absent from files written before the breakdown existed
        if parts:
            lines += ["", f"Scene descriptions ({parts['descriptions']}), per object in reading order ({parts['objects']}): "
                      + ", ".join(f"{field} {share:.2f}" for field, share in parts["per_object"].items()) + "."]

    stage4 = _merged_shapes_results(sources.get("stage4_shapes_eval"))
    after_stage4 = _load_json(sources.get("understanding_after_stage4"))
    lines += _stage4_section(stage4, (shapes or {}).get("geneval_seen"), before, after_stage4)

    binding = _load_json(sources.get("binding"))
    if binding:
        rows = list(binding["colour_by_grid_row"])
        lines += ["", "## Prompt binding of stage 2 (`eval binding`)", "",
                  f"How often an image's own caption gives the lowest image-token loss among captions that differ "
                  f"only in the colour or only in the shape ({binding['images']} one-object validation images).", "",
                  "| attribute | chance | all | " + " | ".join(f"grid row {r}" for r in rows) + " |",
                  "|---" * (len(rows) + 3) + "|"]
        for attribute in ("colour", "shape"):
            by_row = binding[f"{attribute}_by_grid_row"]
            cells = [f"{by_row[r]['accuracy']:.2f} ({by_row[r]['images']})" if r in by_row else "-" for r in rows]
            lines.append(f"| {attribute} | {binding['chance'][attribute]:.2f} | {binding[attribute]:.3f} | "
                         + " | ".join(cells) + " |")

    if shapes:
        lines += ["", "## ShapesEval", "", f"Sampler: `{json.dumps(shapes['sampler'])}`", ""]
        headline = [(name, shapes[key]) for name, key in (("seen", "geneval_seen"), ("held-out", "geneval"))
                    if key in shapes]
        if headline:
            lines += ["**" + ", ".join(
                f"{name} {r['overall']:.3f}" + (f" ± {r['overall_standard_error']:.3f}" if "overall_standard_error" in r else "")
                for name, r in headline) + "** (ShapesEval on seen and on held-out colour/shape pairs, "
                "± one standard error)", ""]
        sets = {"held-out pairs": shapes["geneval"]} if "geneval" in shapes else {}
        if "geneval_seen" in shapes:
            sets["seen pairs"] = shapes["geneval_seen"]
        if "geneval_seen_combinations" in shapes:
            sets["seen pairs (control)"] = shapes["geneval_seen_combinations"]
        if "knowledge_without_reasoning" in shapes:
            sets["riddles, no reasoning"] = shapes["knowledge_without_reasoning"]
            sets["riddles, reasoning"] = shapes["knowledge_with_reasoning"]
        if "knowledge_seen_without_reasoning" in shapes:
            sets["seen-pair riddles, no reasoning"] = shapes["knowledge_seen_without_reasoning"]
            sets["seen-pair riddles, reasoning"] = shapes["knowledge_seen_with_reasoning"]
        if "edit" in shapes:
            sets["edits"] = shapes["edit"]
        lines += _score_table(sets)
        lines += _objects_table({k: v for k, v in sets.items() if k in ("held-out pairs", "seen pairs")})
        if "reasoning_suffix" in shapes:
            lines += ["", f"Reasoning mode appended {json.dumps(shapes['reasoning_suffix'])} to the base's answers."]
        if "riddle_answer_accuracy" in shapes:
            lines += ["", f"The base answered {shapes['riddle_answer_accuracy']:.3f} of the riddles with the right caption."]
        if "seen_riddle_answer_accuracy" in shapes:
            lines += ["", f"The base answered {shapes['seen_riddle_answer_accuracy']:.3f} of the seen-pair riddles "
                          "with the right caption."]
        from lit_star.eval.shapes import GRID_COLUMNS, grid_prompts_path  # torch: not before preflight

        lines += ["", "## Sample grids", ""]
        for grid in shapes.get("grids", []) + (stage4 or {}).get("grids", []):
            relative = os.path.relpath(grid, run_dir)
            lines.append(f"**{Path(grid).stem}**  \n![{Path(grid).stem}]({relative})\n")
            prompts = grid_prompts_path(grid)
            if prompts.is_file():
                tiles = prompts.read_text(encoding="utf-8").splitlines()
                lines.append(f"Tiles row by row, {GRID_COLUMNS} per row: "
                             + "; ".join(f"{i} {prompt}" for i, prompt in enumerate(tiles, 1)) + "\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
