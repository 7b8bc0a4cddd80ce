"""Checking a run's ``fit`` arguments with LightningCLI's own parser, without building anything.

A misspelt key (``--model.init_args.num_stack_layer``), a value of the wrong type or a missing recipe is
reported for its point before any run starts, and the resolved config (every ``${...}`` resolved, the
defaults filled in) is what ``sweep run`` writes as ``<run_dir>/resolved_config.yaml``.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

from lit_star.training import StarCLI


class _ParseOnlyCLI(StarCLI):
    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:  # parsing must not reseed the caller's generators
        pass


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resolved_fit_config(fit_argv: list[str], env: dict[str, str] | None = None) -> str:
    """The YAML config ``python -m lit_star fit`` would run with ``fit_argv`` (``fit`` first), or a
    ``ValueError`` carrying the parser's message (it names the bad key or file)."""
    if not fit_argv or fit_argv[0] != "fit":
        raise ValueError(f"expected a fit argv, got {fit_argv[:1]}")
    stderr = io.StringIO()
    with _environment(env or {}), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli = _ParseOnlyCLI(args=list(fit_argv[1:]), run=False)
        except SystemExit as err:  # jsonargparse reports errors by exiting
            message = stderr.getvalue().strip().splitlines()
            raise ValueError("\n".join(message[-6:]) or f"fit arguments rejected (exit {err.code})") from None
    return cli.parser.dump(cli.config)
