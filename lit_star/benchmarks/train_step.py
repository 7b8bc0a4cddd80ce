"""Stage 2 training step: eager vs ``torch.compile`` of every decoder layer (``compile_layers``).

    python -m lit_star bench train-step                      # the Shapes stage 2 geometry, CPU, 2 threads, ~2 min
    python -m lit_star bench train-step --threads 1 --steps 10
    python -m lit_star bench train-step --device cuda --batch 64 --dtype bfloat16

Two copies of one randomly initialised STAR stack (the tiny base, ``--stack_layers`` stacked layers, a
1,024 x 16 codebook, as in ``recipes/shapes/stage2_stacked_ar.yaml``) train on the same batches: Shapes
world captions of every GenEval category, so batch lengths vary as in the recipe, and random 16 x 16
code grids, through the same layout, loss and AdamW step as ``StackedARModule``. One copy runs eager;
in the other :func:`~lit_star.distributed.plans.compile_modules` compiles the base's and the stack's
decoder layers. Their steps alternate, so a change in the machine's speed during the run hits both.

Printed: the first compiled step's extra time (the compilation), the median step time of each copy, and
their ratio. The two copies must give the same first loss within 1e-5 and stay within ``--tolerance``
(relative) over the timed steps; exit 1 otherwise. Wall clock (after ``torch.cuda.synchronize`` on CUDA).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Literal

import copy
import random
import statistics
import time

import torch

from lit_star.benchmarks import finish
from lit_star.benchmarks.generate import _sync
from lit_star.worlds.shapes.generator import sample_prompt
from lit_star.worlds.shapes.world import GENEVAL_CATEGORIES
from lit_star.distributed.plans import compile_modules, require_compile_toolchain
from lit_star.models.base_vlm import build_tiny_base_vlm, decoder_layers
from lit_star.models.flavours import STACK_FLAVOURS
from lit_star.models.sequence_layout import SequenceLayout, collate_padded
from lit_star.models.stacked_ar import StackedAR
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.modules.stacked_ar_module import TextToImageObjective

CODE_GRID = 16  # the Shapes VQ's 64 px images at 4x downsampling


def shapes_captions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sample_prompt(rng, GENEVAL_CATEGORIES[i % len(GENEVAL_CATEGORIES)], False, 64).caption for i in range(count)]


class Trainee:
    """One stack, its optimizer and the shared codebook table; ``step`` is one training step."""

    def __init__(self, stacked_ar: StackedAR, codebook_table: torch.Tensor, lr: float) -> None:
        self.objective = TextToImageObjective(stacked_ar).train()
        self.codebook_table = codebook_table
        trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step(self, batch) -> float:
        loss, _ = self.objective(batch, self.codebook_table[batch.code_ids])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def bench(
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16"] = "float32",
    threads: int = 2,
    batch: int = 16,
    stack_layers: int = 4,
    steps: int = 20,
    warmup: int = 3,
    lr: float = 2e-3,
    tolerance: float = 1e-3,
    seed: int = 0,
    json: str | None = None,
) -> int:
    """Stage 2 training step: an eager and a compiled copy of one stack on the same batches, steps alternating.

    Args:
        device: cpu, cuda, ...
        dtype: the frozen base's dtype.
        threads: CPU threads (the curriculum's stage 2 has 2).
        batch: samples per step.
        stack_layers: stacked layers on the tiny base.
        steps: timed steps of each copy, after the warm-up.
        warmup: untimed steps of each copy (the first compiles).
        lr: AdamW learning rate of both copies.
        tolerance: largest relative loss difference allowed.
        seed: seed of models and batches.
        json: also write the results here.
    """
    args = SimpleNamespace(**locals())
    if args.steps < 1 or args.warmup < 1:
        print("bench train-step: --steps and --warmup must be >= 1", file=sys.stderr)
        return 2
    require_compile_toolchain("bench train-step")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    flavour = STACK_FLAVOURS["tiny"]
    captions = shapes_captions(512, args.seed)
    tokenizer = train_qwen2_tokenizer(captions, vocab_size=400, min_frequency=1)
    torch.manual_seed(args.seed)
    base = build_tiny_base_vlm(tokenizer, flavour.base_architecture).to(device=device, dtype=getattr(torch, args.dtype))
    eager_model = StackedAR(base, args.stack_layers, flavour.adapter_depth, flavour.codebook_size, flavour.codebook_dim)
    eager_model = eager_model.to(device)
    compiled_model = copy.deepcopy(eager_model)
    compiled_layers = compile_modules([*decoder_layers(compiled_model.base), *compiled_model.stack.layers])
    codebook_table = torch.randn(flavour.codebook_size, flavour.codebook_dim, device=device)
    trainees = {"eager": Trainee(eager_model, codebook_table, args.lr), "compiled": Trainee(compiled_model, codebook_table, args.lr)}

    layout = SequenceLayout(tokenizer, base.config)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    def make_batch():
        samples = [
            layout.text_to_image(rng.choice(captions), torch.randint(0, flavour.codebook_size, (CODE_GRID, CODE_GRID), generator=generator))
            for _ in range(args.batch)
        ]
        return collate_padded(samples, layout.special.pad).to(device)

    print(f"device {device}, {torch.get_num_threads()} thread(s), base {args.dtype}, batch {args.batch}, "
          f"tiny base + {args.stack_layers} stacked layers, {compiled_layers} decoder layers compiled")
    times: dict[str, list[float]] = {name: [] for name in trainees}
    losses: dict[str, list[float]] = {name: [] for name in trainees}
    lengths = []
    for _ in range(args.warmup + args.steps):
        batch = make_batch()
        lengths.append(batch.input_ids.shape[1])
        for name, trainee in trainees.items():
            _sync(device)
            start = time.perf_counter()
            losses[name].append(trainee.step(batch))
            _sync(device)
            times[name].append(time.perf_counter() - start)

    eager_ms = statistics.median(times["eager"][args.warmup:]) * 1e3
    compiled_ms = statistics.median(times["compiled"][args.warmup:]) * 1e3
    compile_s = times["compiled"][0] - times["eager"][0]
    relative = [abs(c - e) / abs(e) for e, c in zip(losses["eager"], losses["compiled"])]
    ok = relative[0] <= 1e-5 and max(relative) <= args.tolerance
    results = {
        "settings": vars(args),
        "sequence_lengths": sorted(set(lengths)),
        "compile_seconds": compile_s,
        "eager_ms_per_step": eager_ms,
        "compiled_ms_per_step": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "first_loss_relative_difference": relative[0],
        "max_loss_relative_difference": max(relative),
        "losses": losses,
    }
    print(f"sequence lengths {min(lengths)}-{max(lengths)} tokens; first compiled step {compile_s:.1f} s slower (compilation)")
    print(f"median step over {args.steps}: eager {eager_ms:.0f} ms, compiled {compiled_ms:.0f} ms -> {eager_ms / compiled_ms:.2f}x")
    print(f"loss, relative difference: first step {relative[0]:.1e}, largest {max(relative):.1e} "
          f"(tolerance {args.tolerance:.0e}); last losses {losses['eager'][-1]:.4f} / {losses['compiled'][-1]:.4f}")
    return finish(results, args.json, ok, "bench train-step: the compiled step's loss left the eager one (see above)")
