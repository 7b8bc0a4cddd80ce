"""The jobs behind ``python -m lit_star``: one table of every command (:data:`COMMANDS`).

Each job is a typed function whose parameters and docstring make its options (see :mod:`lit_star.cli`).
"""

from __future__ import annotations

import importlib
from typing import Union

# A job is (one-line help, "module:function"); a group is (one-line help, {name: job or group}).
Job = tuple[str, str]
Group = tuple[str, dict[str, Union["Job", "Group"]]]

COMMANDS: dict[str, Job | Group] = {
    "data": ("Generate datasets.", {
        "shapes": ("Generate the procedural Shapes world (webdataset shards + eval sets).",
                   "lit_star.worlds.shapes.generator:generate"),
    }),
    "eval": ("Evaluate images, a base VLM or a stage 2 checkpoint.", {
        "shapes": ("ShapesEval: score a folder of images, or generate the world's eval sets first (--ckpt).",
                   "lit_star.commands.eval:shapes"),
        "understanding": ("VQA and riddle accuracy of a base VLM or of the frozen base in a stage 2 checkpoint.",
                          "lit_star.commands.eval:understanding"),
        "binding": ("Whether a stage 2 model prefers an image's own colour/shape caption (likelihood).",
                    "lit_star.commands.eval:binding"),
        "decoders": ("Table 7a in small: the VQ decoder vs stage 3 diffusion decoders on ground-truth codes.",
                     "lit_star.commands.eval:decoders"),
    }),
    "tokenize": ("Encode image shards into VQ code shards with a VQ checkpoint (resumable).",
                 "lit_star.commands.tokenize:tokenize"),
    "export": ("Export a trained stage.", {
        "vq": ("STAR-VQ tokenizer: reference-layout VQ-Model.pt and/or safetensors + config.json.",
               "lit_star.commands.export:vq"),
        "base": ("Stage 0 base VLM: a Hugging Face Qwen2.5-VL directory from a BaseVLMModule checkpoint.",
                 "lit_star.commands.export:base"),
        "diffusion-decoder": ("Stage 3 decoder: reference-layout diffusion_decoder.* and/or a save_decoder directory.",
                              "lit_star.commands.export:diffusion_decoder"),
    }),
    "import-reference": ("Import a released STAR checkpoint (reference layout) with exact key coverage.",
                         "lit_star.commands.import_reference:import_reference"),
    "generate": ("Text-to-image with a stage 2 checkpoint (KV cache, CFG, top-k/top-p, reasoning).",
                 "lit_star.commands.generate:generate"),
    "edit": ("Edit images with instructions using a stage 2 checkpoint.", "lit_star.commands.generate:edit"),
    "understand": ("Answer a question about an image with the frozen base VLM.",
                   "lit_star.commands.generate:understand"),
    "decode": ("Decode VQ code grids/shards with the VQ or the stage 3 diffusion decoder, at any size.",
               "lit_star.commands.decode:decode"),
    "bench": ("Benchmarks that print ratios against a baseline measured in the same run.", {
        "quantize": ("Nearest-code search vs the reference's repeat-the-codebook search.",
                     "lit_star.benchmarks.quantize:bench"),
        "ar-loss": ("Chunked image-token cross-entropy vs one-shot logits: peak memory and equality.",
                    "lit_star.benchmarks.ar_loss:bench"),
        "generate": ("KV-cached decoding vs prefix recompute, top-k-first filter, batch scaling.",
                     "lit_star.benchmarks.generate:bench"),
        "decode": ("Diffusion decoder: DiT sampling step time (tiny, mid), guidance rows batched vs sequential.",
                   "lit_star.benchmarks.decode:bench"),
        "train-step": ("Stage 2 training step: eager vs torch.compile of every decoder layer.",
                       "lit_star.benchmarks.train_step:bench"),
    }),
    "curriculum": ("Run the whole Shapes curriculum end to end, resuming finished steps.",
                   "lit_star.commands.curriculum:curriculum"),
    "sweep": ("Ablation sweeps: run a grid locally or on SLURM (resumable), see its status, collect its table.", {
        "run": ("Expand a sweep file, then launch its unfinished runs (local or SLURM), skipping finished ones.",
                "lit_star.commands.sweep:run"),
        "status": ("Show which runs of a sweep directory are done, running or failed, with wall times.",
                   "lit_star.commands.sweep:status"),
        "collect": ("Write results.csv, results.md, plots and a TensorBoard hparams view of a sweep directory.",
                    "lit_star.commands.sweep:collect"),
    }),
}


# Jobs whose required parameters are positional (``curriculum RECIPE``); every other job's are flags.
POSITIONAL_JOBS = {"lit_star.commands.curriculum:curriculum", "lit_star.commands.sweep:run",
                   "lit_star.commands.sweep:status", "lit_star.commands.sweep:collect"}


def usage(prefix: str, entries: dict) -> str:
    width = max(len(n) for n in entries) + 2
    lines = [f"usage: python -m lit_star {prefix}<subcommand> [options]", "", "subcommands:"]
    for name, (text, _) in entries.items():
        lines.append(f"  {name:<{width}}{text}")
    lines += ["", f"Run `python -m lit_star {prefix}<subcommand> --help` for its options."]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """``(command path, "module:function", remaining argv)`` for ``argv``; raises ``KeyError`` naming the bad word."""
    path, entries = [], COMMANDS
    while True:
        if not argv or argv[0] not in entries:
            prefix = "".join(f"{p} " for p in path)
            word = argv[0] if argv else None
            raise KeyError(f"lit_star: unknown subcommand {word!r}\n\n{usage(prefix, entries)}")
        name, argv = argv[0], argv[1:]
        path.append(name)
        target = entries[name][1]
        if isinstance(target, str):
            return path, target, argv
        if not argv or argv[0] in ("-h", "--help"):
            raise LookupError(usage(" ".join(path) + " ", target))
        entries = target


def job_function(target: str):
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)
