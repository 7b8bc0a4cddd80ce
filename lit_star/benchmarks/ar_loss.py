"""Image-token cross-entropy: chunked (``lit_star.models.ar_loss``) vs one-shot logits, at the STAR-3B head size.

    python -m lit_star bench ar-loss                        # hidden 2048 -> 65,536 codes, B=8 x (32 prompt + 576 image)
    python -m lit_star bench ar-loss --batch 2 --chunk_size 1024

One training step of the loss: forward and backward to the stack output and the pixel head (fp32).
The one-shot baseline is the naive ``head(hidden)`` over all B x T positions, then cross-entropy with
ignored prompt positions; the chunked loss only scores image-token positions, ``--chunk_size`` at a time,
computing each chunk's gradients as it goes (see ``lit_star.models.ar_loss``).

Peak extra memory: each variant runs once in a fresh child process. Its inputs, the head and
pre-allocated gradient buffers are resident first and the code is paged in by a tiny warm-up; then the
peak RSS (``VmHWM``, reset just before the step) minus the RSS before the step is what the loss itself
added. On CUDA it is ``max_memory_allocated`` minus the allocation before the step.
Both variants' loss and gradients must agree within ``--tolerance`` (default 1e-5); exit 1 otherwise.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lit_star.benchmarks.memory import proc_status_bytes, reset_peak_rss
from lit_star.models.ar_loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy, one_shot_cross_entropy
from lit_star.models.sequence_layout import IGNORE_INDEX

VARIANTS = ("one-shot", "chunked")


def make_inputs(args: SimpleNamespace, device: str) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """Stack output B x T x hidden, labels (prompt positions ignored), and a pixel head, all seeded."""
    gen = torch.Generator().manual_seed(args.seed)
    length = args.prompt_len + args.image_tokens
    hidden = torch.randn(args.batch, length, args.hidden, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch, length), generator=gen)
    labels[:, : args.prompt_len] = IGNORE_INDEX
    head = nn.Linear(args.hidden, args.classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * args.hidden**-0.5)
        head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * 0.02)
    hidden = hidden.to(device).requires_grad_(True)
    return hidden, labels.to(device), head.to(device)


def loss_step(
    variant: str, hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear, chunk_size: int
) -> torch.Tensor:
    if variant == "chunked":
        loss = chunked_cross_entropy(hidden, labels, head.weight, head.bias, chunk_size=chunk_size)
    else:
        loss = one_shot_cross_entropy(hidden, labels, head.weight, head.bias)
    loss.backward()
    return loss.detach()


def _zero_grad_buffers(hidden: torch.Tensor, head: nn.Module) -> None:
    # Resident before the step, so backward accumulates in place and only the loss's own memory is measured.
    hidden.grad = torch.zeros_like(hidden)
    for p in head.parameters():
        p.grad = torch.zeros_like(p)


def run_child(variant: str, args: SimpleNamespace) -> int:
    hidden, labels, head = make_inputs(args, args.device)
    warm_hidden = hidden[:1, -8:].detach().requires_grad_(True)
    loss_step(variant, warm_hidden, labels[:1, -8:], head, chunk_size=4)  # page in kernels on a tiny problem
    _zero_grad_buffers(hidden, head)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    loss = loss_step(variant, hidden, labels, head, args.chunk_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_status_bytes("VmHWM")
    seconds = time.perf_counter() - start
    torch.save(
        {"loss": loss.cpu(), "hidden_grad": hidden.grad.cpu(), "weight_grad": head.weight.grad.cpu(),
         "bias_grad": head.bias.grad.cpu()},
        args.child_out,
    )
    print(json.dumps({"peak_extra_bytes": max(0, peak - before), "seconds": seconds}))
    return 0


def run_variant(variant: str, args: SimpleNamespace, out: Path) -> dict:
    child = [
        sys.executable, "-m", "lit_star", "bench", "ar-loss", "--child", variant, "--child_out", str(out),
        "--batch", str(args.batch), "--image_tokens", str(args.image_tokens), "--prompt_len", str(args.prompt_len),
        "--hidden", str(args.hidden), "--classes", str(args.classes), "--chunk_size", str(args.chunk_size),
        "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed),
    ]
    result = subprocess.run(child, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def bench(
    batch: int = 8,
    image_tokens: int = 576,
    prompt_len: int = 32,
    hidden: int = 2048,
    classes: int = 65536,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tolerance: float = 1e-5,
    threads: int = 1,
    device: str = "cpu",
    seed: int = 0,
    child: Literal["one-shot", "chunked"] | None = None,
    child_out: str | None = None,
) -> int:
    """Chunked image-token cross-entropy vs one-shot logits: peak memory, time and equality.

    Args:
        batch: rows.
        image_tokens: labelled positions per row (24 x 24 codes).
        prompt_len: unlabelled prompt positions per row.
        hidden: LLM hidden size (2048 for STAR-3B).
        classes: codebook size.
        chunk_size: positions whose logits exist at once in the chunked loss.
        tolerance: largest difference allowed between the two losses and gradients.
        threads: torch intra-op threads.
        device: cpu, cuda, ...
        seed: seed of the random inputs.
        child: internal: run one variant in this (child) process.
        child_out: internal: where the child writes its loss and gradients.
    """
    args = SimpleNamespace(**locals())
    torch.set_num_threads(args.threads)
    if args.child:
        return run_child(args.child, args)

    length = args.prompt_len + args.image_tokens
    logits_bytes = args.batch * length * args.classes * 4
    print(
        f"image-token cross-entropy, forward + backward: B={args.batch} x T={length} ({args.image_tokens} labelled), "
        f"hidden {args.hidden} -> {args.classes} classes, fp32, {args.device}, {args.threads} thread(s)\n"
        f"one-shot logits alone: {_mib(logits_bytes)}; chunked: {args.chunk_size} positions per chunk "
        f"({_mib(args.chunk_size * args.classes * 4)} of logits)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        stats, results = {}, {}
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.pt"
            stats[variant] = run_variant(variant, args, out)
            results[variant] = torch.load(out, weights_only=True)
            print(f"  {variant:>8}: peak extra {_mib(stats[variant]['peak_extra_bytes']):>12}   "
                  f"step {stats[variant]['seconds']:.2f}s   loss {results[variant]['loss'].item():.6f}", flush=True)
    ratio = stats["one-shot"]["peak_extra_bytes"] / max(stats["chunked"]["peak_extra_bytes"], 1)
    print(f"  memory ratio one-shot / chunked: {ratio:.1f}x")
    worst = 0.0
    for name in ("loss", "hidden_grad", "weight_grad", "bias_grad"):
        diff = (results["one-shot"][name] - results["chunked"][name]).abs().max().item()
        worst = max(worst, diff)
        print(f"  max |one-shot - chunked| {name:<11}: {diff:.2e}")
    if worst > args.tolerance:
        print(f"ERROR: chunked loss differs from one-shot by {worst:.2e} > {args.tolerance}", file=sys.stderr)
        return 1
    print(f"equal within {args.tolerance}")
    return 0

