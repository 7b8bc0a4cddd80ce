"""Benchmarks run end to end at toy sizes and check their own equality claims."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_ar_loss_reports_memory_and_equal_losses():
    out = subprocess.run(
        [sys.executable, "-m", "lit_star", "bench", "ar-loss", "--batch", "2", "--image-tokens", "32", "--prompt-len", "4",
         "--hidden", "64", "--classes", "512", "--chunk-size", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory ratio one-shot / chunked" in out.stdout
    assert "equal within 1e-05" in out.stdout


def test_bench_generate_compares_cached_and_recomputed_codes():
    out = subprocess.run(
        [sys.executable, "-m", "lit_star", "bench", "generate", "--flavours", "tiny", "--recompute-tokens", "16",
         "--image-tokens", "16", "--batch-sizes", "1", "2", "--filter-rows", "2", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "identical kept sets: True" in out.stdout
    assert "identical codes: True" in out.stdout
    assert "576 / 1 =" in out.stdout and "batch 2:" in out.stdout
