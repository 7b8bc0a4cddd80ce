"""Image-token decoding speed: KV caches vs prefix recompute, flat per-step cost, top-k-first filter, batching.

    python -m lit_star bench generate                                   # tiny + mid flavours, CPU, ~2-3 min
    python -m lit_star bench generate --flavours [tiny] --recompute_tokens 576
    python -m lit_star bench generate --device cuda --flavours [tiny,mid] --batch_sizes [1,4,16,64] --static_cache true

Models are randomly initialised STAR stacks built in code (timings do not depend on the weights), prompt
of ~20 tokens, guidance on (2 rows per image), sampling with top-k 1000 / top-p 0.8 through the same
:func:`~lit_star.sampling.decoding.decode_image_codes` the CLI uses. Measured in one run:

(a) KV-cached decoding vs recomputing the whole sequence at every step
    (:func:`~lit_star.sampling.decoding.decode_image_codes_without_cache`): tokens/s of each and the ratio,
    over the same number of tokens. Both decode greedily so that their codes can be compared: they must be
    identical in fp32 (exit 1 otherwise); with sampling, one rounding-level difference at a CDF boundary
    would legitimately send the two down different paths. The filter's cost is measured in (c);
(b) the cached per-step time at positions 1, 64, 256 and 576 (median of the 9 steps around each), which
    should stay flat;
(c) the top-k-first filter vs the reference's full-sort filter over 65,536 logits: time ratio, and the kept
    sets must be identical (exit 1 otherwise);
(d) images/s of cached decoding as the batch grows.

Clock: on CPU with one thread, the CPU time of this process (``time.process_time``), so other jobs on a
shared machine do not inflate the numbers; otherwise wall time (after ``torch.cuda.synchronize`` on CUDA).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Literal

import torch

from lit_star.benchmarks import finish
from lit_star.models.base_vlm import build_tiny_base_vlm, tiny_spec
from lit_star.models.flavours import STACK_FLAVOURS
from lit_star.models.sequence_layout import SequenceLayout
from lit_star.models.stacked_ar import StackedAR
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.sampling.decoding import DecodeOptions, decode_image_codes, decode_image_codes_without_cache
from lit_star.sampling.filtering import (
    SamplerConfig,
    filter_logits,
    full_sort_filter,
    make_generators,
    top_k_top_p,
)
from lit_star.sampling.modes import text_to_image_prefix

STEP_POSITIONS = (1, 64, 256, 576)
# (a) tokens per image: the full 576 on tiny; fewer on mid, whose recompute baseline grows quadratically.
RECOMPUTE_TOKENS = {"tiny": 576, "mid": 128}
# (d) tokens per image: the Shapes world's 16 x 16 grid on tiny; 8 x 8 on mid to keep the default run short.
SCALING_TOKENS = {"tiny": 256, "mid": 64}
FILTER_VOCAB = 65536


# The stack flavours (lit_star.models.flavours) this bench runs; their bases are tiny ones.
FLAVOURS = ("tiny", "mid")


PROMPTS = [
    "a red circle above a blue square",
    "two green triangles to the left of a yellow star",
    "three purple hexagons",
    "a small orange square below a large cyan circle",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device):
    """``process_time`` for single-threaded CPU runs (immune to other load), else ``perf_counter``."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


class Bench:
    """One flavour's model, codebook and prompt prefixes."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        flavour = STACK_FLAVOURS[name]
        self.name = name
        tokenizer = train_qwen2_tokenizer(PROMPTS * 8, vocab_size=400, min_frequency=1)
        torch.manual_seed(seed)
        base = build_tiny_base_vlm(tokenizer, flavour.base_architecture).to(device=device, dtype=dtype).eval()
        self.model = StackedAR(
            base, flavour.num_stack_layers, flavour.adapter_depth, flavour.codebook_size, flavour.codebook_dim,
            dtype=dtype,
        ).eval()
        self.codebook_table = torch.randn(flavour.codebook_size, flavour.codebook_dim, device=device, dtype=dtype)
        self.layout = SequenceLayout(tokenizer, base.config)
        self.device = device
        self.clock = _clock(device)
        spec = tiny_spec(flavour.base_architecture)
        params = sum(p.numel() for p in self.model.parameters())
        self.description = (f"{name}: hidden {spec.hidden_size}, {spec.num_hidden_layers} base + "
                            f"{flavour.num_stack_layers} stacked layers, {flavour.codebook_size} codes, "
                            f"{params / 1e6:.1f}M parameters")

    def codebook(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook_table[codes.to(self.device)]

    def prefix(self, batch: int, sampler: SamplerConfig):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        return text_to_image_prefix(self.layout, prompts, sampler.uses_guidance)

    def decode(self, batch: int, tokens: int, sampler: SamplerConfig, options: DecodeOptions, cached: bool = True,
               step_times: list[float] | None = None) -> tuple[torch.Tensor, float]:
        generators = make_generators(range(batch))
        prefix = self.prefix(batch, sampler)
        progress = None
        if step_times is not None:
            def progress(_: int) -> None:
                _sync(self.device)
                step_times.append(self.clock())
        _sync(self.device)
        start = self.clock()
        if cached:
            codes = decode_image_codes(self.model, self.codebook, prefix, tokens, sampler, generators, options, progress)
        else:
            codes = decode_image_codes_without_cache(self.model, self.codebook, prefix, tokens, sampler, generators)
        _sync(self.device)
        return codes, self.clock() - start


def bench_cache_vs_recompute(bench: Bench, args, sampler: SamplerConfig, options: DecodeOptions) -> dict:
    tokens = args.recompute_tokens or RECOMPUTE_TOKENS[bench.name]
    greedy = replace(sampler, greedy=True)
    bench.decode(args.batch, 4, greedy, options)  # warm-up (allocations, code paths)
    cached_codes, cached_s = bench.decode(args.batch, tokens, greedy, options, cached=True)
    recompute_codes, recompute_s = bench.decode(args.batch, tokens, greedy, options, cached=False)
    n = args.batch * tokens
    return {
        "tokens_per_image": tokens,
        "images": args.batch,
        "cached_tokens_per_s": n / cached_s,
        "recompute_tokens_per_s": n / recompute_s,
        "speedup": recompute_s / cached_s,
        "identical_codes": bool(torch.equal(cached_codes, recompute_codes)),
    }


def bench_step_times(bench: Bench, args, sampler: SamplerConfig, options: DecodeOptions) -> dict:
    stamps: list[float] = []
    tokens = max(STEP_POSITIONS) + 5
    _, total_s = bench.decode(args.batch, tokens, sampler, options, step_times=stamps)
    # stamps[i] is taken after code i is chosen; the step that feeds code i-1 at position i lies between.
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {}
    for position in STEP_POSITIONS:
        window = step_s[max(0, position - 5) : position + 4]
        result[f"position_{position}_ms"] = 1000 * statistics.median(window)
    result["ratio_576_vs_1"] = result["position_576_ms"] / result["position_1_ms"]
    return result


def bench_filter(args, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    # Peaked like trained logits (a few plausible codes, a long tail), so top-p actually cuts inside top-k.
    logits = (torch.randn(args.filter_rows, FILTER_VOCAB, generator=gen) * 3.0).to(device)
    timings = {"top_k_first": [], "full_sort": []}
    clock = _clock(device)
    for _ in range(args.repeats + 1):  # first round is a warm-up
        for name, fn in (("top_k_first", top_k_top_p), ("full_sort", full_sort_filter)):
            _sync(device)
            start = clock()
            fn(logits, args.top_k, args.top_p)
            _sync(device)
            timings[name].append(clock() - start)
    ours = torch.isfinite(filter_logits(logits, args.top_k, args.top_p))
    reference = torch.isfinite(full_sort_filter(logits, args.top_k, args.top_p))
    best = {name: min(times[1:]) for name, times in timings.items()}
    return {
        "rows": args.filter_rows,
        "vocab": FILTER_VOCAB,
        "top_k_first_ms": 1000 * best["top_k_first"],
        "full_sort_ms": 1000 * best["full_sort"],
        "speedup": best["full_sort"] / best["top_k_first"],
        "identical_kept_sets": bool(torch.equal(ours, reference)),
        "mean_kept": float(ours.sum(dim=-1).float().mean()),
    }


def bench_batch_scaling(bench: Bench, args, sampler: SamplerConfig, options: DecodeOptions) -> dict:
    tokens = args.image_tokens or SCALING_TOKENS[bench.name]
    result = {"tokens_per_image": tokens}
    for batch in args.batch_sizes:
        bench.decode(batch, 2, sampler, options)  # warm-up at this batch shape
        _, seconds = bench.decode(batch, tokens, sampler, options)
        result[f"batch_{batch}_images_per_s"] = batch / seconds
    return result


def bench(
    flavours: list[str] = list(FLAVOURS),
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    threads: int = 1,
    batch: int = 1,
    recompute_tokens: int | None = None,
    image_tokens: int | None = None,
    batch_sizes: list[int] = [1, 4, 16],
    filter_rows: int = 16,
    top_k: int = 1000,
    top_p: float = 0.8,
    cfg: float = 3.0,
    repeats: int = 5,
    static_cache: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    seed: int = 0,
    json: str | None = None,
) -> int:
    """KV-cached decoding vs prefix recompute, the top-k-first filter, and batch scaling (see the module docstring).

    Args:
        flavours: model sizes to run (keys of ``FLAVOURS``).
        device: cpu, cuda, ...
        dtype: the models' dtype.
        threads: torch intra-op threads.
        batch: images for (a) and (b); x2 rows with guidance.
        recompute_tokens: (a) tokens per image (default per flavour, ``RECOMPUTE_TOKENS``).
        image_tokens: (d) tokens per image (default per flavour, ``SCALING_TOKENS``).
        batch_sizes: (d) images per batch.
        filter_rows: (c) rows of 65,536 logits.
        top_k: sampler top-k.
        top_p: sampler top-p.
        cfg: guidance weight.
        repeats: (c) timed rounds (the best is reported).
        static_cache: preallocated KV caches, fixed-shape steps.
        compile: torch.compile the decode step (GPU).
        compile_mode: torch.compile mode, e.g. reduce-overhead.
        seed: seed of models and inputs.
        json: also write the results here.
    """
    args = SimpleNamespace(**locals())
    unknown = sorted(set(flavours) - set(FLAVOURS))
    if unknown:
        print(f"bench generate: unknown flavours {unknown}; choose from {sorted(FLAVOURS)}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sampler = SamplerConfig(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p)
    options = DecodeOptions(static_cache=args.static_cache, compile=args.compile, compile_mode=args.compile_mode)
    clock = "process CPU time" if _clock(device) is time.process_time else "wall time"
    print(f"device {device}, {args.dtype}, {torch.get_num_threads()} thread(s), {clock}, cfg {args.cfg}, "
          f"top-k {args.top_k}, top-p {args.top_p}, static cache {options.uses_static_cache}, compile {args.compile}")
    results: dict = {"settings": vars(args)}
    ok = True

    filt = bench_filter(args, device)
    results["filter"] = filt
    ok &= filt["identical_kept_sets"]
    print(f"(c) filter over {filt['rows']} x {filt['vocab']:,} logits: top-k-first {filt['top_k_first_ms']:.2f} ms, "
          f"full sort {filt['full_sort_ms']:.2f} ms -> {filt['speedup']:.1f}x; identical kept sets: "
          f"{filt['identical_kept_sets']} (mean kept {filt['mean_kept']:.0f})")

    for name in args.flavours:
        bench = Bench(name, device, dtype, args.seed)
        print(f"\n{bench.description}")
        cache = bench_cache_vs_recompute(bench, args, sampler, options)
        # Reduced precision may round the two paths differently and flip a sampled code; fp32 must agree.
        ok &= cache["identical_codes"] or dtype != torch.float32
        print(f"(a) {cache['images']} images x {cache['tokens_per_image']} tokens, greedy: cached "
              f"{cache['cached_tokens_per_s']:.0f} tok/s, recompute {cache['recompute_tokens_per_s']:.0f} tok/s -> "
              f"{cache['speedup']:.1f}x; identical codes: {cache['identical_codes']}")
        steps = bench_step_times(bench, args, sampler, options)
        print("(b) cached step time: " + ", ".join(f"pos {p}: {steps[f'position_{p}_ms']:.2f} ms" for p in STEP_POSITIONS)
              + f"; 576 / 1 = {steps['ratio_576_vs_1']:.2f}")
        scaling = bench_batch_scaling(bench, args, sampler, options)
        print(f"(d) {scaling['tokens_per_image']}-token images/s: "
              + ", ".join(f"batch {b}: {scaling[f'batch_{b}_images_per_s']:.2f}" for b in args.batch_sizes))
        results[name] = {"model": bench.description, "cache_vs_recompute": cache, "step_times": steps, "batch_scaling": scaling}
        del bench

    return finish(results, args.json, ok, "bench generate: a correctness check failed (see above)")
