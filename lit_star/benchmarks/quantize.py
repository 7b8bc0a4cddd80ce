"""Nearest-code search: our chunked matmul vs the reference's repeat-the-codebook-per-batch search.

    python -m lit_star bench quantize                       # 65,536 x 512 codebook, B x 576 x 512, B in {1, 4, 16}
    python -m lit_star bench quantize --batch_sizes [1,4] --threads 1 --repeats 3

Time: both variants run in this process on the same inputs, alternating, best of ``--repeats`` after a
warm-up round.
Peak extra memory: on CPU torch keeps no allocator statistics and a process's peak RSS only grows, so
each variant is run once in a fresh child process that reports its peak RSS (``VmHWM``, reset just
before the call) minus its RSS just before the call, with the inputs resident and the code paged in by
a tiny warm-up call: the physical memory the search added, BLAS work buffers included.
On CUDA it is ``max_memory_allocated`` minus the allocation before the call, in this process.
The codes of both variants must be identical; the command exits 1 otherwise.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import json
import subprocess
import sys
import time

import torch

from lit_star.benchmarks.memory import proc_status_bytes, reset_peak_rss
from lit_star.models.quantizer import nearest_code_indices
from lit_star.models.vq_config import DEFAULT_SEARCH_CHUNK_ELEMENTS

TOKENS_PER_IMAGE = 576  # 384 px / 16 = 24 x 24
VARIANTS = ("repeat", "chunked")


def repeat_codebook_search(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Baseline, the reference's method: copy the codebook per batch element, build the full B x L x K
    distance tensor ``|z|^2 + |e|^2 - 2 z.e`` with a batched einsum, then argmin."""
    embedding = codebook[None].repeat(z.shape[0], 1, 1)
    distances = (
        torch.sum(z**2, dim=2, keepdim=True)
        + torch.sum(embedding**2, dim=2).unsqueeze(1)
        - 2 * torch.einsum("bld,bnd->bln", z, embedding)
    )
    return torch.argmin(distances, dim=2)


def chunked_search(z: torch.Tensor, codebook: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    return nearest_code_indices(z.reshape(-1, z.shape[-1]), codebook, chunk_elements).view(z.shape[:2])


def make_inputs(batch: int, codebook_size: int, dim: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codebook = torch.randn(codebook_size, dim, generator=gen).to(device)
    z = torch.randn(batch, TOKENS_PER_IMAGE, dim, generator=gen).to(device)
    return z, codebook


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_variant(variant: str, z: torch.Tensor, codebook: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    if variant == "repeat":
        return repeat_codebook_search(z, codebook)
    return chunked_search(z, codebook, chunk_elements)


def measure_peak_extra_bytes(variant: str, args: SimpleNamespace, batch: int) -> int:
    """Peak memory the variant adds on top of its resident inputs (see module docstring)."""
    if args.device.startswith("cuda"):
        z, codebook = make_inputs(batch, args.codebook_size, args.dim, args.device, args.seed)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _run_variant(variant, z, codebook, args.chunk_elements)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    child = [sys.executable, "-m", "lit_star", "bench", "quantize", "--peak_memory_child", variant,
             "--batch_sizes", f"[{batch}]", "--threads", str(args.threads), "--codebook_size", str(args.codebook_size),
             "--dim", str(args.dim), "--chunk_elements", str(args.chunk_elements), "--seed", str(args.seed)]
    result = subprocess.run(child, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child for {variant!r} failed:\n{result.stderr}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def _peak_memory_child(variant: str, args: SimpleNamespace) -> int:
    z, codebook = make_inputs(args.batch_sizes[0], args.codebook_size, args.dim, "cpu", args.seed)
    # Page in the code both variants run (BLAS kernels) on a tiny problem, so that only data is measured.
    _run_variant(variant, z[:1, :8], codebook[:256], args.chunk_elements)
    reset_peak_rss()
    before = proc_status_bytes("VmRSS")
    _run_variant(variant, z, codebook, args.chunk_elements)
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({"peak_extra_bytes": max(0, peak - before)}))
    return 0


def time_variants(z: torch.Tensor, codebook: torch.Tensor, args: SimpleNamespace) -> dict[str, tuple[float, torch.Tensor]]:
    """Best wall time and codes per variant. Runs alternate between the variants so that load from other
    processes on a shared machine hits both alike; the first round is a warm-up."""
    best = {variant: float("inf") for variant in VARIANTS}
    codes = {}
    for round_index in range(args.repeats + 1):
        for variant in VARIANTS:
            _sync(args.device)
            start = time.perf_counter()
            codes[variant] = _run_variant(variant, z, codebook, args.chunk_elements)
            _sync(args.device)
            if round_index > 0:
                best[variant] = min(best[variant], time.perf_counter() - start)
    return {variant: (best[variant], codes[variant]) for variant in VARIANTS}


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f} MiB"


def bench(
    batch_sizes: list[int] = [1, 4, 16],
    threads: int = 1,
    codebook_size: int = 65536,
    dim: int = 512,
    chunk_elements: int = DEFAULT_SEARCH_CHUNK_ELEMENTS,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
    peak_memory_child: Literal["repeat", "chunked"] | None = None,
) -> int:
    """Nearest-code search: ours (chunked) vs the reference's repeat-the-codebook search; time, memory, equality.

    Args:
        batch_sizes: images per timed batch.
        threads: torch intra-op threads (CPU).
        codebook_size: codes in the codebook.
        dim: code dimension.
        chunk_elements: bound on one distance tile (rows x codes) of our search.
        repeats: timed runs per variant (the best is reported).
        device: cpu, cuda, ...
        seed: seed of the random inputs.
        peak_memory_child: internal: measure one variant's peak memory in this (child) process.
    """
    args = SimpleNamespace(**locals())
    torch.set_num_threads(args.threads)
    if args.peak_memory_child:
        return _peak_memory_child(args.peak_memory_child, args)

    print(f"nearest-code search: codebook {args.codebook_size} x {args.dim}, inputs B x {TOKENS_PER_IMAGE} x {args.dim}, "
          f"fp32, device {args.device}, {args.threads} thread(s), tile <= {args.chunk_elements} distances, "
          f"best of {args.repeats}")
    header = f"{'B':>3} | {'repeat time':>11} {'chunked time':>12} {'speed-up':>8} | " \
             f"{'repeat peak':>13} {'chunked peak':>13} {'mem ratio':>9} | codes"
    print(header)
    print("-" * len(header))
    all_identical = True
    for batch in args.batch_sizes:
        z, codebook = make_inputs(batch, args.codebook_size, args.dim, args.device, args.seed)
        timed = time_variants(z, codebook, args)
        (t_repeat, codes_repeat), (t_chunked, codes_chunked) = timed["repeat"], timed["chunked"]
        del z, codebook
        identical = torch.equal(codes_repeat, codes_chunked)
        all_identical &= identical
        mem_repeat = measure_peak_extra_bytes("repeat", args, batch)
        mem_chunked = measure_peak_extra_bytes("chunked", args, batch)
        print(f"{batch:>3} | {t_repeat:>10.3f}s {t_chunked:>11.3f}s {t_repeat / t_chunked:>7.2f}x | "
              f"{_mib(mem_repeat)} {_mib(mem_chunked)} {mem_repeat / max(mem_chunked, 1):>8.1f}x | "
              f"{'identical' if identical else 'DIFFERENT'}", flush=True)
    if not all_identical:
        print("ERROR: the chunked search returned different codes from the reference method", file=sys.stderr)
        return 1
    return 0

