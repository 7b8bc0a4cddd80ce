"""Research probes: one-off analyses behind the findings in ``docs/`` (not part of the product CLI).

Each is a module whose ``run`` function is its command line (jsonargparse, so ``--config`` works too)::

    python -m lit_star.experiments.grid_probe --base runs/shapes/stage0_base/hf --images 600
    python -m lit_star.experiments.prompt_probe --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt
    python -m lit_star.experiments.code_loss --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \\
        --shards 'runs/shapes_world/t2i_codes/val-*.tar'

Experiments may import the core; the core never imports them (torchtitan's rule).
"""


def write_json(results: dict, out: str | None) -> None:
    """Write an experiment's results as JSON when ``out`` is given."""
    if out:
        import json
        from pathlib import Path

        Path(out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def command_line(run) -> int:
    """Serve ``run`` (a typed function with a docstring) as ``python -m lit_star.experiments.NAME``."""
    from jsonargparse import CLI

    return int(CLI(run, as_positional=False) or 0)
