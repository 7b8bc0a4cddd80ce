"""Launching a sweep's runs through submitit, locally or on SLURM, resumably, one failure at a time.

Each run is one :class:`RunJob`: inside a submitit job it runs the point's stages (earlier fits, each in
``<run_dir>/<stage>``), then ``python -m lit_star fit ...`` (each fit with ``--ckpt_path last`` when its
directory already holds a ``last.ckpt``), then each eval step, every one as a subprocess whose output goes
to ``<run_dir>/logs/<step>.log``. What happened is kept in
``<run_dir>/sweep/status.json`` (state, times, each step's return code and log) and one marker per
finished step in ``<run_dir>/sweep/done/``, so a rerun of ``sweep run`` skips finished runs and steps.

A failing step marks its run ``failed`` (with the log's tail) and the job returns normally: the other
runs go on. Under SLURM a job that hits its time limit is requeued by submitit (``Checkpointable``) and
resumes from ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lit_star.sweeps.spec import Run

STATUS = "sweep/status.json"
DONE = "sweep/done"
INDEX = "sweep_index.json"          # in the sweep directory: every run and the sweep's settings
SUBMITIT_DIR = ".submitit"

try:  # submitit is a runtime dependency; keep this module importable for `status` without it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover
    _Checkpointable = object


def read_status(run_dir: str | Path) -> dict:
    path = Path(run_dir) / STATUS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: str | Path, status: dict) -> None:
    path = Path(run_dir) / STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


def _update_status(run_dir: str | Path, **changes: Any) -> dict:
    status = read_status(run_dir)
    status.update(changes)
    write_status(run_dir, status)
    return status


def step_done(run_dir: str | Path, step: str) -> bool:
    return (Path(run_dir) / DONE / step).exists()


def run_finished(run: Run) -> bool:
    """Stages, fit and every eval marked done, and each eval's declared output present."""
    if not all(step_done(run.run_dir, name) for name in ["fit", *(s["name"] for s in run.stages)]):
        return False
    return all(step_done(run.run_dir, e["name"]) and (not e.get("output") or Path(e["output"]).exists())
               for e in run.evals)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _rank() -> int:
    for var in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def fit_command(run: Run) -> list[str]:
    """The fit argv of ``run`` now: with ``--ckpt_path last`` once a ``last.ckpt`` exists (resume)."""
    return resumed(run.fit_argv, run.run_dir)


def resumed(fit_argv: list[str], root: str | Path) -> list[str]:
    """``fit_argv`` (a fit in ``root``) with ``--ckpt_path last`` once ``root`` holds a ``last.ckpt``."""
    argv = list(fit_argv)
    if (Path(root) / "checkpoints" / "last.ckpt").exists() and "--ckpt_path" not in argv:
        argv += ["--ckpt_path", "last"]
    return argv


def _fits(run: Run) -> list[tuple[str, list[str], str]]:
    """(step name, argv now, directory) of each fit of ``run`` in order: its stages, then its own fit."""
    return [(s["name"], resumed(s["fit_argv"], s["run_dir"]), s["run_dir"]) for s in run.stages] + \
        [("fit", fit_command(run), run.run_dir)]


def fit_incomplete(run_dir: str | Path) -> str | None:
    """Why a fit that exited 0 did not finish, or None. Lightning stops gracefully on SIGTERM and exits 0,
    so the exit code alone would mark a killed fit done: its ``last.ckpt`` must exist and hold
    ``trainer.max_steps`` (from ``resolved_config.yaml``; not checked for a sharded checkpoint folder)."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return "the fit exited 0 but left no checkpoints/last.ckpt"
    config = run_dir / "resolved_config.yaml"
    if not ckpt.is_file() or not config.is_file():
        return None
    import yaml

    max_steps = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_steps")
    if not isinstance(max_steps, int) or max_steps < 0:
        return None
    import torch

    try:
        step = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    except Exception:  # not a torch checkpoint we can read: leave the judgement to the steps after
        return None
    if isinstance(step, int) and step < max_steps:
        return f"the fit stopped at step {step} of {max_steps} (stopped by a signal?)"
    return None


class RunJob(_Checkpointable):
    """What one submitit job executes: the fit and evals of one run, in subprocesses."""

    def __init__(self, run: Run, threads: int | None = None, python: str | None = None,
                 lit_star: tuple[str, ...] = ("-m", "lit_star")) -> None:
        self.run = run
        self.threads = threads
        self.python = python or sys.executable
        self.lit_star = tuple(lit_star)

    def _env(self, for_eval: bool) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.run.env}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if for_eval:
            # Evals are single-process jobs: keep Lightning from reading the SLURM task layout of the fit.
            env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        return env

    def _step(self, name: str, argv: list[str], for_eval: bool) -> tuple[int, float, Path]:
        log = Path(self.run.run_dir) / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(log, "ab") as handle:
            handle.write(f"\n[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} python {' '.join(self.lit_star)} "
                         f"{shlex.join(argv)}\n".encode())
            handle.flush()
            process = subprocess.Popen([self.python, *self.lit_star, *argv], env=self._env(for_eval),
                                       stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
            if _rank() == 0:
                _update_status(self.run.run_dir, child_pid=process.pid)  # so `sweep run` can stop it
            try:
                code = process.wait()
            except BaseException:  # interrupted (Ctrl-C, SLURM timeout signal): stop the child with us
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                raise
        return code, time.time() - start, log

    def __call__(self) -> dict:
        run, rank = self.run, _rank()
        run_dir = Path(run.run_dir)
        if rank != 0:
            # Another task of a multi-GPU job: train every fit (Lightning reads its rank from SLURM), nothing else.
            # Rank 0 marks a fit done only after it ends, which needs every rank, so the markers agree here.
            for name, argv, _ in _fits(run):
                if not step_done(run_dir, name):
                    code, _, _ = self._step(f"{name}.rank{rank}", argv, for_eval=False)
                    if code:
                        raise RuntimeError(f"{name} failed on rank {rank} (exit {code})")
            return {"state": "done", "rank": rank}
        status = read_status(run_dir)
        steps = status.get("steps", {})
        started = time.time()
        status.update(state="running", host=socket.gethostname(), pid=os.getpid(), started_at=started,
                      ended_at=None, error=None, failed_step=None, log=None, point=run.point, seed=run.seed,
                      job_id=os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
                      attempts=status.get("attempts", 0) + 1, steps=steps)
        write_status(run_dir, status)
        # (name, argv, the fit's directory or None for an eval, the eval's declared output)
        plan = [(name, argv, root, None) for name, argv, root in _fits(run)] + \
            [(e["name"], e["argv"], None, e.get("output")) for e in run.evals]
        try:
            for name, argv, fit_root, output in plan:
                for_eval = fit_root is None
                if step_done(run_dir, name) and (not output or Path(output).exists()):
                    continue
                if output:
                    # not every job makes its --out's folder (eval binding does not)
                    Path(output).parent.mkdir(parents=True, exist_ok=True)
                steps[name] = {"state": "running", "started_at": time.time(), "argv": argv}
                _update_status(run_dir, steps=steps)
                code, seconds, log = self._step(name, argv, for_eval)
                steps[name].update(state="done" if code == 0 else "failed", returncode=code, seconds=round(seconds, 1),
                                   log=str(log))
                state = "failed"
                if code == 0 and output and not Path(output).exists():
                    code = -1
                    steps[name].update(state="failed", returncode=None)
                    error = f"{name}: exited 0 but did not write its output {output}"
                elif code == 0 and not for_eval and (why := fit_incomplete(fit_root)):
                    code, state, error = -1, "interrupted", f"{name}: {why}; rerun to resume"
                    steps[name].update(state=state)
                elif code < 0:  # killed by a signal: resumable, not a bug in the run
                    state, error = "interrupted", f"{name} killed by signal {-code}; log {log}"
                    steps[name].update(state=state)
                elif code:
                    error = f"{name} exited with {code}; log {log}:\n{_tail(log)}"
                if code:
                    return _update_status(run_dir, state=state, ended_at=time.time(), steps=steps, error=error,
                                          failed_step=name, log=str(log))
                marker = run_dir / DONE / name
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{seconds:.1f}\n")
                _update_status(run_dir, steps=steps)
        except BaseException as err:
            _update_status(run_dir, state="interrupted", ended_at=time.time(), steps=steps,
                           error=f"{type(err).__name__}: {err}")
            raise
        return _update_status(run_dir, state="done", ended_at=time.time(), steps=steps,
                              wall_seconds=round(sum(s.get("seconds", 0) for s in steps.values()), 1))


def describe(run: Run, threads: int | None = None, python: str = "python") -> str:
    """The commands a run executes, as a shell would type them (``--dry_run true``)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items())
    env = (env + " " if env else "") + (f"OMP_NUM_THREADS={threads} " if threads else "")
    lines = [f"# {run.point} seed {run.seed} -> {run.run_dir}" + ("  (done, skipped)" if run_finished(run) else "")]
    for _, argv, _ in _fits(run):
        lines.append(f"{env}{python} -m lit_star {shlex.join(argv)}")
    for step in run.evals:
        lines.append(f"{env}{python} -m lit_star {shlex.join(step['argv'])}")
    return "\n".join(lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_state(status: dict) -> str:
    """``status.json``'s state, with a ``running`` run whose process on this host is gone shown as
    ``interrupted`` (killed without a chance to record it)."""
    state = status.get("state") or "pending"
    if state == "running" and status.get("host") == socket.gethostname() and status.get("pid") \
            and not _pid_alive(int(status["pid"])):
        return "interrupted"
    return state


# ------------------------------------------------------------------------------------------- local


def run_local(runs: list[Run], sweep_dir: str | Path, max_parallel: int = 1, threads: int | None = None,
              gpus: list[int] | None = None, gpus_per_run: int = 0, timeout_min: float = 7 * 24 * 60,
              log: Callable[[str], None] = print, poll_seconds: float = 0.5,
              lit_star: tuple[str, ...] = ("-m", "lit_star")) -> dict[str, str]:
    """Run the unfinished runs with submitit's ``LocalExecutor``, at most ``max_parallel`` at a time.

    ``threads`` is the CPU budget shared by the parallel runs (each gets ``threads // max_parallel``
    through ``OMP_NUM_THREADS``); with ``gpus_per_run`` each run gets its own slice of ``gpus``
    (``CUDA_VISIBLE_DEVICES``). Returns ``{run_dir: final state}``; a failed run never stops the others.
    """
    import submitit

    per_run_threads = max(1, (threads or os.cpu_count() or 1) // max_parallel)
    gpus = list(gpus or [])
    slots = [gpus[i * gpus_per_run:(i + 1) * gpus_per_run] for i in range(max_parallel)] if gpus_per_run else \
        [[] for _ in range(max_parallel)]
    if gpus_per_run and any(len(s) < gpus_per_run for s in slots):
        raise ValueError(f"--max_parallel {max_parallel} x {gpus_per_run} GPU(s) per run needs "
                         f"{max_parallel * gpus_per_run} GPUs; visible: {gpus}")
    executor = submitit.LocalExecutor(folder=str(Path(sweep_dir) / SUBMITIT_DIR / "%j"))
    results: dict[str, str] = {}
    pending = []
    for run in runs:
        if run_finished(run):
            log(f"[sweep] {run.point} seed {run.seed}: done already, skipping")
            results[run.run_dir] = "done"
        elif effective_state(read_status(run.run_dir)) == "running":
            log(f"[sweep] {run.point} seed {run.seed}: running in another process (pid "
                f"{read_status(run.run_dir).get('pid')}), skipping")
            results[run.run_dir] = "running"
        else:
            pending.append(run)
    running: dict[int, tuple[Any, Run]] = {}  # slot -> (job, run)

    def _stop(signum, frame):  # SIGTERM: as Ctrl-C (a background shell may ignore SIGINT)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
    try:
        while pending or running:
            free = [slot for slot in range(max_parallel) if slot not in running]
            while pending and free:
                slot, run = free.pop(0), pending.pop(0)
                executor.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus_per_run,
                                           visible_gpus=slots[slot], tasks_per_node=1)
                resume = " (resuming from last.ckpt)" if any("--ckpt_path" in argv for _, argv, _ in _fits(run)) else ""
                job = executor.submit(RunJob(run, per_run_threads, lit_star=lit_star))
                log(f"[sweep] {run.point} seed {run.seed}: started{resume}, {per_run_threads} thread(s)"
                    + (f", GPUs {slots[slot]}" if slots[slot] else "") + f", logs {run.run_dir}/logs")
                running[slot] = (job, run)
            time.sleep(poll_seconds)
            for slot, (job, run) in list(running.items()):
                if not job.done():
                    continue
                del running[slot]
                try:
                    state = job.result().get("state", "done")
                except Exception as err:  # the job died outside a step (import error, signal, ...)
                    stderr = getattr(job, "paths", None)
                    where = str(stderr.stderr) if stderr is not None else "?"
                    _update_status(run.run_dir, state="failed", ended_at=time.time(),
                                   error=f"submitit job failed: {str(err)[-2000:]}", log=where)
                    state = "failed"
                results[run.run_dir] = state
                status = read_status(run.run_dir)
                detail = f": {status['error'].splitlines()[0]}" if state != "done" and status.get("error") else ""
                log(f"[sweep] {run.point} seed {run.seed}: {state}{detail}")
    except KeyboardInterrupt:
        for job, run in running.values():
            job.cancel(check=False)
            # The step's own process too: SIGINT may be ignored down the tree; Lightning stops on SIGTERM.
            child = read_status(run.run_dir).get("child_pid")
            if child and _pid_alive(int(child)):
                try:
                    os.kill(int(child), signal.SIGTERM)
                except OSError:
                    pass
            log(f"[sweep] {run.point} seed {run.seed}: cancelled (rerun `sweep run` to resume)")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


# ------------------------------------------------------------------------------------------- SLURM


def slurm_parameters(settings: dict, runs: int, max_parallel: int | None, job_name: str) -> dict:
    """submitit ``SlurmExecutor`` parameters from the sweep file's ``slurm`` section (plus flags).

    One task per GPU on every node, so each task is one Lightning rank (``SLURMEnvironment``)."""
    gpus = int(settings.get("gpus_per_node", 0) or 0)
    params = {
        "job_name": str(settings.get("job_name") or job_name),
        "time": int(settings.get("time", 60)),
        "nodes": int(settings.get("nodes", 1)),
        "ntasks_per_node": max(1, gpus),
        "array_parallelism": int(max_parallel or runs),
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "cpus_per_task", "mem", "account", "qos", "constraint"):
        if settings.get(key) not in (None, ""):
            params[key] = settings[key]
    if settings.get("setup"):
        params["setup"] = [str(line) for line in settings["setup"]]
    if settings.get("additional_parameters"):
        params["additional_parameters"] = dict(settings["additional_parameters"])
    return params


def slurm_fit_args(settings: dict) -> list[str]:
    """What a multi-GPU point adds to fit: one process per GPU, on every node."""
    gpus, nodes = int(settings.get("gpus_per_node", 0) or 0), int(settings.get("nodes", 1))
    return ["--trainer.devices", str(gpus), "--trainer.num_nodes", str(nodes)] if gpus > 1 or nodes > 1 else []


def sbatch_script(params: dict, folder: str | Path, python: str | None = None) -> str:
    """The sbatch script submitit submits for the sweep's job array (no cluster needed to write it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = shlex.quote(python or sys.executable)
    folder = Path(folder).absolute()  # as submitit's executor makes it
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = dict(params)
    runs = params.pop("map_count", None)
    return _make_sbatch_string(command=command, folder=folder, map_count=runs, **params)


def submit_slurm(runs: list[Run], sweep_dir: str | Path, params: dict, log: Callable[[str], None] = print) -> dict:
    """Submit every unfinished run as one job array; returns ``{run_dir: job id}``."""
    import submitit

    todo = []
    for run in runs:
        status = read_status(run.run_dir)
        if run_finished(run):
            log(f"[sweep] {run.point} seed {run.seed}: done already, skipping")
        elif not _slurm_job_gone(status):
            log(f"[sweep] {run.point} seed {run.seed}: already queued as job {status.get('job_id')}, skipping")
        else:
            todo.append(run)
    if not todo:
        return {}
    executor = submitit.SlurmExecutor(folder=str(Path(sweep_dir) / SUBMITIT_DIR / "%j"))
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(RunJob(run)) for run in todo]
    ids = {}
    for run, job in zip(todo, jobs):
        _update_status(run.run_dir, state="submitted", job_id=job.job_id, submitted_at=time.time(),
                       host=None, pid=None)
        log(f"[sweep] {run.point} seed {run.seed}: submitted as job {job.job_id}")
        ids[run.run_dir] = job.job_id
    return ids


def _slurm_job_gone(status: dict) -> bool:
    """Whether a run recorded as submitted/running on SLURM no longer has a job in the queue."""
    if status.get("state") not in ("submitted", "running") or not status.get("job_id"):
        return True
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(status["job_id"])], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False  # cannot tell: do not submit twice
    return out.returncode != 0 or not out.stdout.strip()
