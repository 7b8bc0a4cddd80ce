"""Benchmarks: ``python -m lit_star bench {quantize,ar-loss,generate,decode,train-step}``.

Each prints absolute numbers and ratios against a baseline measured in the same run.
"""

from lit_star.commands._dispatch import dispatch

BENCHMARKS = {
    "quantize": ("Nearest-code search vs the reference's repeat-the-codebook search.", "lit_star.benchmarks.quantize:main"),
    "ar-loss": ("Chunked image-token cross-entropy vs one-shot logits: peak memory and equality.", "lit_star.benchmarks.ar_loss:main"),
    "generate": ("KV-cached decoding vs prefix recompute, top-k-first filter, batch scaling.", "lit_star.benchmarks.generate:main"),
    "decode": ("Diffusion decoder: DiT sampling step time (tiny, mid), guidance rows batched vs sequential.", "lit_star.benchmarks.decode:main"),
    "train-step": ("Stage 2 training step: eager vs torch.compile of every decoder layer.", "lit_star.benchmarks.train_step:main"),
}


def main(argv: list[str]) -> int:
    return dispatch("bench", BENCHMARKS, argv)
