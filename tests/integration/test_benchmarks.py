"""Benchmarks run end to end at toy sizes and check their own equality claims."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # each spawns a benchmark process (7-55 s on 2 cores)


def test_bench_ar_loss_reports_memory_and_equal_losses():
    out = subprocess.run(
        [sys.executable, "-m", "lit_star", "bench", "ar-loss", "--batch", "2", "--image_tokens", "32", "--prompt_len", "4",
         "--hidden", "64", "--classes", "512", "--chunk_size", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory ratio one-shot / chunked" in out.stdout
    assert "equal within 1e-05" in out.stdout


def test_bench_generate_compares_cached_and_recomputed_codes():
    out = subprocess.run(
        [sys.executable, "-m", "lit_star", "bench", "generate", "--flavours", "[tiny]", "--recompute_tokens", "16",
         "--image_tokens", "16", "--batch_sizes", "[1, 2]", "--filter_rows", "2", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "identical kept sets: True" in out.stdout
    assert "identical codes: True" in out.stdout
    assert "576 / 1 =" in out.stdout and "batch 2:" in out.stdout


def test_bench_train_step_compares_compiled_and_eager_steps(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lit_star", "bench", "train-step", "--threads", "1", "--batch", "2",
         "--stack_layers", "1", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "bench.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "5 decoder layers compiled" in out.stdout  # the tiny base's 4 and the one stacked layer
    assert "eager" in out.stdout and "compiled" in out.stdout and "x\n" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["first_loss_relative_difference"] <= 1e-5
    assert len(result["losses"]["eager"]) == len(result["losses"]["compiled"]) == 3
    assert result["eager_ms_per_step"] > 0 and result["compiled_ms_per_step"] > 0


def test_bench_decode_compares_batched_and_sequential_guidance_rows(tmp_path):
    from lit_star.benchmarks.decode import bench

    assert bench(flavours=["tiny"], size=8, steps=2, min_ratio=0, json=str(tmp_path / "bench.json")) == 0
    result = json.loads((tmp_path / "bench.json").read_text())["flavours"]["tiny"]
    assert result["same_latents"] and result["step_s_batched"] > 0 and result["ratio"] > 0
