"""A sweep directory with known numbers, for the collector's tests and the ablations notebook's."""

import json
from pathlib import Path

import yaml

from lit_star.sweeps.prepare import prepare
from lit_star.sweeps.spec import load_sweep


def _write(path: Path, content) -> str:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


def fabricated_sweep(tmp_path):
    """Three points x three seeds with known losses (TensorBoard) and scores (JSON); one run without output."""
    from torch.utils.tensorboard import SummaryWriter

    recipe = _write(tmp_path / "r.yaml", {})
    path = _write(tmp_path / "s.yaml", {
        "name": "fab", "configs": [recipe], "seeds": [0, 1, 2],
        "grid": {"model.init_args.num_stack_layers": [1, 2, 4]},
        "baseline": {"model.init_args.num_stack_layers": 4},
        "metrics": {"val_loss": {"tensorboard": "val/loss"}, "best_loss": {"tensorboard": "val/loss", "reduce": "min"},
                    "colour": {"json": "eval/binding.json", "key": "colour", "label": "colour binding"}},
    })
    runs = prepare(load_sweep(path), tmp_path / "sweep", check=False, log=lambda _: None)
    loss = {1: [1.0, 1.1, 1.2], 2: [0.5, 0.7, 0.6], 4: [0.8, 0.9, 1.0]}
    for run in runs:
        depth, seed = run.axes["model.init_args.num_stack_layers"], run.seed
        if depth == 2 and seed == 2:
            continue  # never ran
        writer = SummaryWriter(str(Path(run.run_dir) / "tensorboard"))
        for step, value in [(10, 9.0), (20, loss[depth][seed] - 0.3), (30, loss[depth][seed])]:
            writer.add_scalar("val/loss", value, step)
        writer.close()
        (Path(run.run_dir) / "eval").mkdir()
        (Path(run.run_dir) / "eval/binding.json").write_text(json.dumps({"colour": depth / 10 + seed / 100}))
        (Path(run.run_dir) / "sweep/status.json").write_text(json.dumps({"state": "done", "wall_seconds": 60.0}))
    return runs
