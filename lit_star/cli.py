"""The ``python -m lit_star`` command line: one table of every job.

    python -m lit_star --help
    python -m lit_star fit --config recipes/shapes/stage1_vq.yaml --config recipes/trainer/cpu.yaml
    python -m lit_star data shapes --out runs/shapes_world
    python -m lit_star eval shapes --config my_eval.yaml --sampler.cfg_scale 4

``fit``/``validate``/``test``/``predict`` go to :class:`lit_star.training.StarCLI` (LightningCLI). Every
other job is a typed function served by jsonargparse, the machinery LightningCLI uses: its parameters
and docstring make its options and ``--help``, and each job takes ``--config job.yaml`` (repeatable,
later files and flags win) and ``--print_config``. A job's module is imported only when it runs, so
``--help`` stays fast.
"""

from __future__ import annotations

import sys

from lit_star.commands import COMMANDS, POSITIONAL_JOBS, job_function, resolve, usage

TRAINER_SUBCOMMANDS = {
    "fit": "Train a stage from YAML recipes (--config a.yaml --config b.yaml, overrides win).",
    "validate": "Run validation of a stage from recipes and a checkpoint.",
    "test": "Run the test loop of a stage from recipes and a checkpoint.",
    "predict": "Run the predict loop of a stage from recipes and a checkpoint.",
}


def run_job(path: list[str], target: str, argv: list[str]) -> int:
    """Parse ``argv`` (``--config`` files and flags) against the job's signature and call it."""
    from jsonargparse import CLI

    result = CLI(job_function(target), args=argv, prog=f"python -m lit_star {' '.join(path)}",
                 as_positional=target in POSITIONAL_JOBS, parser_mode="omegaconf")
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        trainer = {name: (text, "") for name, text in TRAINER_SUBCOMMANDS.items()}
        print(usage("", {**trainer, **COMMANDS}))
        return 0
    if argv[0] in TRAINER_SUBCOMMANDS:
        from lit_star.training import run_trainer_cli

        # LightningCLI warns when given args while sys.argv also holds some; let it read sys.argv then.
        run_trainer_cli(None if from_command_line else argv)
        return 0
    try:
        path, target, rest = resolve(argv)
    except LookupError as help_or_error:  # KeyError is a LookupError: an unknown word, or a group's --help
        unknown = isinstance(help_or_error, KeyError)
        print(help_or_error.args[0], file=sys.stderr if unknown else sys.stdout)
        return 2 if unknown else 0
    return run_job(path, target, rest)
