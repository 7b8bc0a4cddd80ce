"""The ``python -m lit_star`` command line.

    python -m lit_star --help
    python -m lit_star fit --config recipes/shapes/stage1_vq.yaml --config recipes/trainer/cpu.yaml
    python -m lit_star data shapes --out runs/shapes_world

``fit``/``validate``/``test``/``predict`` go to :class:`lit_star.training.StarCLI` (LightningCLI).
Every other subcommand is a job module exposing ``main(argv) -> int``; it is imported only
when called, so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

TRAINER_SUBCOMMANDS = {
    "fit": "Train a stage from YAML recipes (--config a.yaml --config b.yaml, overrides win).",
    "validate": "Run validation of a stage from recipes and a checkpoint.",
    "test": "Run the test loop of a stage from recipes and a checkpoint.",
    "predict": "Run the predict loop of a stage from recipes and a checkpoint.",
}

# name -> (one-line help, "module:function")
JOB_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("Generate datasets: `data shapes --out DIR` writes the Shapes world.", "lit_star.commands.data:main"),
    "eval": ("Score images: `eval shapes --prompts P.jsonl --images DIR` (or --ckpt to generate first).", "lit_star.commands.eval:main"),
    "tokenize": ("Encode image shards into VQ code shards with a VQ checkpoint (resumable).", "lit_star.commands.tokenize:main"),
    "export": ("Export a trained stage to the reference layout or safetensors + config.json.", "lit_star.commands.export:main"),
    "import-reference": ("Import a released STAR checkpoint (reference layout) with exact key coverage.", "lit_star.commands.import_reference:main"),
    "generate": ("Text-to-image with a stage 2 checkpoint (KV cache, CFG, top-k/top-p, reasoning).", "lit_star.commands.generate:main"),
    "edit": ("Edit an image with an instruction using a stage 2 checkpoint.", "lit_star.commands.generate:edit_main"),
    "understand": ("Answer a question about an image with the frozen base VLM.", "lit_star.commands.generate:understand_main"),
    "bench": ("Benchmarks that print ratios against an in-run baseline (quantize, ar-loss, generate).", "lit_star.commands.bench:main"),
    "curriculum": ("Run the whole Shapes curriculum end to end, resuming finished stages.", "lit_star.commands.curriculum:main"),
    "sweep": ("Ablation sweeps: `sweep run FILE` (local or SLURM, resumable), `sweep status DIR`, `sweep collect DIR`.", "lit_star.commands.sweep:main"),
}


def _usage() -> str:
    width = max(len(n) for n in [*TRAINER_SUBCOMMANDS, *JOB_SUBCOMMANDS]) + 2
    lines = ["usage: python -m lit_star <subcommand> [options]", "", "subcommands:"]
    for name, text in TRAINER_SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}{text}")
    for name, (text, _) in JOB_SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}{text}")
    lines += ["", "Run `python -m lit_star <subcommand> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in TRAINER_SUBCOMMANDS:
        from lit_star.training import run_trainer_cli

        # LightningCLI warns when given args while sys.argv also holds some; let it read sys.argv then.
        run_trainer_cli(None if from_command_line else [name, *rest])
        return 0
    if name not in JOB_SUBCOMMANDS:
        print(f"lit_star: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = JOB_SUBCOMMANDS[name][1].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
