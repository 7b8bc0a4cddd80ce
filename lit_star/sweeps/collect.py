"""Collecting a sweep: each run's metrics, a row per point over seeds, a baseline comparison, plots.

The same functions serve ``python -m lit_star sweep collect DIR`` and ``notebooks/ablations.ipynb``::

    from lit_star.sweeps import load_results, plot_metric
    results = load_results("runs/sweeps/shapes_6b_depth")
    results.table            # one dict per point: n, <metric>_mean, <metric>_std, ...
    plot_metric(results, "val_loss")

A metric is a TensorBoard scalar of the run (``tensorboard: val/loss``; ``reduce`` last/min/max/mean over
the logged steps, or the last value logged at or before ``step``; ``dir`` another event folder under the run directory, e.g. the
``stage2/tensorboard`` of a fit run as an eval step) or a value in an eval's JSON file (``json: eval/binding.json``,
relative to the run directory, ``key: colour``; dotted for nested keys, integers index lists).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_star.sweeps.launch import INDEX, effective_state, read_status


@dataclass
class Results:
    sweep_dir: Path
    index: dict
    runs: list[dict]                       # one per (point, seed): point, seed, axes..., state, metrics
    table: list[dict]                      # one per point
    comparisons: list[dict] = field(default_factory=list)  # point vs baseline, per metric

    @property
    def metrics(self) -> list[str]:
        return list(self.index.get("metrics", {}))

    @property
    def axes(self) -> list[str]:
        return list(self.index.get("axes", []))


def load_index(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory: no {INDEX} (made by `sweep run`)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------- reading


def _tensorboard_scalars(run_dir: Path, tag: str, folder: str = "tensorboard") -> list[tuple[int, float]]:
    """(step, value) of ``tag`` over every event file of the run, the latest write winning per step (a
    resumed run logs the steps after its checkpoint again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, tuple[float, float]] = {}
    for events in sorted((run_dir / folder).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag not in accumulator.Tags().get("scalars", []):
            continue
        for event in accumulator.Scalars(tag):
            if event.step not in by_step or event.wall_time >= by_step[event.step][0]:
                by_step[event.step] = (event.wall_time, event.value)
    return sorted((step, value) for step, (_, value) in by_step.items())


def _json_value(data: Any, key: str) -> Any:
    for part in key.split("."):
        if isinstance(data, list):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            raise KeyError(part)
    return data


def read_metric(run_dir: str | Path, spec: dict) -> float | None:
    """One metric of one run, or None when the run has not produced it (yet)."""
    run_dir = Path(run_dir)
    if "tensorboard" in spec:
        scalars = _tensorboard_scalars(run_dir, str(spec["tensorboard"]), str(spec.get("dir", "tensorboard")))
        if not scalars:
            return None
        if spec.get("step") is not None:
            # the last value logged at or before the step: Lightning logs a validation that runs after
            # training step N (global_step N) at step N - 1
            before = [(step, value) for step, value in scalars if step <= int(spec["step"])]
            return before[-1][1] if before else None
        values = [v for _, v in scalars]
        return {"last": values[-1], "min": min(values), "max": max(values),
                "mean": sum(values) / len(values)}[spec.get("reduce", "last")]
    path = str(spec["json"]).replace("${run_dir}", str(run_dir))
    path = Path(path) if Path(path).is_absolute() else run_dir / path
    try:
        value = _json_value(json.loads(path.read_text()), str(spec["key"]))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def sign_test(differences: list[float]) -> float | None:
    """Two-sided exact sign test: the chance of a split at least this uneven between positive and negative
    differences if each sign were a fair coin (ties dropped). None without a non-zero difference."""
    positive = sum(1 for d in differences if d > 0)
    negative = sum(1 for d in differences if d < 0)
    n = positive + negative
    if n == 0:
        return None
    k = min(positive, negative)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# --------------------------------------------------------------------------------------- gathering


def load_results(sweep_dir: str | Path) -> Results:
    """Every run's state and metrics, and the table over seeds (no files written)."""
    sweep_dir = Path(sweep_dir)
    index = load_index(sweep_dir)
    metrics = index.get("metrics", {})
    runs = []
    for run in index["runs"]:
        status = read_status(run["run_dir"])
        row = {"point": run["point"], "seed": run["seed"], **run.get("axes", {}),
               "state": effective_state(status), "wall_seconds": status.get("wall_seconds")}
        for name, spec in metrics.items():
            row[name] = read_metric(run["run_dir"], spec)
        runs.append(row)

    table = []
    for point in index["points"]:
        rows = [r for r in runs if r["point"] == point["name"]]
        entry = {"point": point["name"], **point.get("axes", {})}
        entry["seeds"] = len(rows)
        entry["done"] = sum(r["state"] == "done" for r in rows)
        for name in metrics:
            # only finished runs: a running one's last value is not its final value
            values = [r[name] for r in rows if r[name] is not None and r["state"] == "done"]
            mean, std = mean_std(values)
            entry[f"{name}_mean"], entry[f"{name}_std"], entry[f"{name}_n"] = mean, std, len(values)
        table.append(entry)

    comparisons = []
    baseline = index.get("baseline")
    if baseline:
        base_rows = {r["seed"]: r for r in runs if r["point"] == baseline}
        for point in index["points"]:
            if point["name"] == baseline:
                continue
            rows = {r["seed"]: r for r in runs if r["point"] == point["name"]}
            for name in metrics:
                diffs = [rows[s][name] - base_rows[s][name] for s in sorted(rows) if s in base_rows
                         and rows[s][name] is not None and base_rows[s][name] is not None
                         and rows[s]["state"] == base_rows[s]["state"] == "done"]
                mean, std = mean_std(diffs)
                comparisons.append({"point": point["name"], "baseline": baseline, "metric": name, "pairs": len(diffs),
                                    "diff_mean": mean, "diff_std": std, "higher": sum(d > 0 for d in diffs),
                                    "lower": sum(d < 0 for d in diffs), "sign_test_p": sign_test(diffs)})
    return Results(sweep_dir, index, runs, table, comparisons)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(results: Results, plots: dict[str, str] | None = None, digits: int = 4) -> str:
    """``results.md``: the table over seeds, the baseline comparison, every run, the plots."""
    index, metrics = results.index, results.metrics
    axes = results.axes
    lines = [f"# Sweep `{index.get('name', results.sweep_dir.name)}`", ""]
    if index.get("description"):
        lines += [str(index["description"]).strip(), ""]
    lines += [f"Sweep file `{index.get('sweep_file')}`; seeds {index.get('seeds')}; mean ± standard deviation over "
              "seeds (n - 1), n = the runs that produced the metric.", ""]
    labels = {name: index["metrics"][name].get("label", name) for name in metrics}
    header = ["point", *axes, "done", *[f"{labels[m]} (n)" for m in metrics]]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for entry in results.table:
        cells = [entry["point"], *["-" if entry.get(a) is None else str(entry.get(a)) for a in axes], f"{entry['done']}/{entry['seeds']}"]
        cells += [f"{_pm(entry[f'{m}_mean'], entry[f'{m}_std'], digits)} ({entry[f'{m}_n']})" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if results.comparisons:
        lines += ["", f"Paired by seed against the baseline `{results.comparisons[0]['baseline']}`: difference point - "
                      "baseline (mean ± std over pairs), how many seeds were higher / lower, and the two-sided exact "
                      "sign test (with n pairs it cannot go below 2 / 2^n: 0.25 for 3, 0.125 for 4).", "",
                  "| point | metric | difference | pairs | higher / lower | sign test p |", "|---|---|---|---|---|---|"]
        for c in results.comparisons:
            lines.append(f"| {c['point']} | {labels[c['metric']]} | {_pm(c['diff_mean'], c['diff_std'], digits)} | "
                         f"{c['pairs']} | {c['higher']} / {c['lower']} | {_fmt(c['sign_test_p'], 3)} |")
    lines += ["", "Every run:", "", "| point | seed | state | wall s | " + " | ".join(labels[m] for m in metrics) + " |",
              "|---" * (4 + len(metrics)) + "|"]
    for row in results.runs:
        lines.append(f"| {row['point']} | {row['seed']} | {row['state']} | {_fmt(row['wall_seconds'], 0)} | "
                     + " | ".join(_fmt(row[m], digits) for m in metrics) + " |")
    for metric, path in (plots or {}).items():
        lines += ["", f"![{labels[metric]}]({path})"]
    return "\n".join(lines) + "\n"


def write_csv(results: Results, path: str | Path) -> None:
    """``results.csv``: one row per point (axes, n, mean and std of each metric, baseline differences)."""
    rows = []
    by_point = {}
    for c in results.comparisons:
        by_point.setdefault(c["point"], {}).update({
            f"{c['metric']}_diff_mean": c["diff_mean"], f"{c['metric']}_diff_std": c["diff_std"],
            f"{c['metric']}_pairs": c["pairs"], f"{c['metric']}_sign_test_p": c["sign_test_p"]})
    for entry in results.table:
        rows.append({**entry, **by_point.get(entry["point"], {})})
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _x_values(results: Results) -> tuple[str | None, list[Any]]:
    """The axis to plot against (the grid's first axis), or None to plot by point name."""
    varying = [a for a in results.axes if len({json.dumps(e.get(a), default=str) for e in results.table}) > 1]
    if not varying:
        return None, [e["point"] for e in results.table]
    return varying[0], [e.get(varying[0]) for e in results.table]


def plot_metric(results: Results, metric: str, ax=None):
    """Mean ± std over seeds (error bars) and every seed (dots) of ``metric`` against the swept axis; one
    line per setting of the other axes. Returns the matplotlib Axes."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 3.5))
    axis, xs = _x_values(results)
    numeric = axis is not None and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    categories = list(dict.fromkeys(xs))
    position = (lambda x: x) if numeric else (lambda x: categories.index(x))
    others = [a for a in results.axes if a != axis
              and len({json.dumps(e.get(a), default=str) for e in results.table}) > 1]
    groups: dict[tuple, list[dict]] = {}
    for entry in results.table:
        groups.setdefault(tuple(entry.get(a) for a in others), []).append(entry)
    for key, entries in groups.items():
        label = ", ".join(f"{a}={v}" for a, v in zip(others, key)) or None
        entries = [e for e in entries if e[f"{metric}_mean"] is not None]
        entries.sort(key=lambda e: position(e.get(axis) if axis else e["point"]))
        if not entries:
            continue
        x = [position(e.get(axis) if axis else e["point"]) for e in entries]
        y = [e[f"{metric}_mean"] for e in entries]
        err = [e[f"{metric}_std"] or 0.0 for e in entries]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=label)
        names = {e["point"] for e in entries}
        seeds = [(position(r.get(axis) if axis else r["point"]), r[metric]) for r in results.runs
                 if r["point"] in names and r[metric] is not None]
        ax.scatter([s[0] for s in seeds], [s[1] for s in seeds], s=12, alpha=0.5, color=line[0].get_color())
    if not numeric:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels([str(c) for c in categories], rotation=20 if len(categories) > 4 else 0)
    ax.set_xlabel(axis.rsplit(".", 1)[-1] if axis else "point")
    ax.set_ylabel(results.index["metrics"][metric].get("label", metric))
    ax.set_title(f"{results.index.get('name', '')}: {metric} (mean ± std over seeds)", fontsize=9)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax


def write_plots(results: Results, out_dir: str | Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for metric in results.metrics:
        if not any(e[f"{metric}_mean"] is not None for e in results.table):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        plot_metric(results, metric, ax=ax)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[metric] = str(path.relative_to(results.sweep_dir))
    return written


def write_hparams(results: Results, out_dir: str | Path) -> int:
    """A TensorBoard HParams view: one event folder per finished run with its axes, point and seed as
    hyperparameters and its metrics (``tensorboard --logdir <sweep>/hparams``)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # rewritten whole, so a rerun of collect does not double the points
    count = 0
    for row in results.runs:
        values = {m: row[m] for m in results.metrics if row[m] is not None}
        if not values:
            continue
        params = {"point": row["point"], "seed": row["seed"]}
        for axis in results.axes:
            value = row.get(axis)
            params[axis] = value if isinstance(value, (int, float, str, bool)) else str(value)
        writer = SummaryWriter(log_dir=str(out_dir / row["point"] / f"seed{row['seed']}"))
        experiment, start, end = hparams(params, {f"hparam/{m}": v for m, v in values.items()})
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for metric, value in values.items():
            writer.add_scalar(f"hparam/{metric}", value)
        writer.close()
        count += 1
    return count


def collect(sweep_dir: str | Path, hparams_view: bool = True) -> Results:
    """Write ``results.csv``, ``results.md``, ``runs.csv``, ``plots/<metric>.png`` and ``hparams/``."""
    results = load_results(sweep_dir)
    sweep_dir = results.sweep_dir
    write_csv(results, sweep_dir / "results.csv")
    with open(sweep_dir / "runs.csv", "w", newline="") as handle:
        fields = ["point", "seed", *results.axes, "state", "wall_seconds", *results.metrics]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in results.runs:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    plots = write_plots(results, sweep_dir / "plots")
    (sweep_dir / "results.md").write_text(markdown(results, plots))
    if hparams_view:
        write_hparams(results, sweep_dir / "hparams")
    return results
