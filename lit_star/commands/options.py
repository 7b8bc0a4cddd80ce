"""Command-line option groups shared by the sampling and evaluation jobs (model source, sampler)."""

from __future__ import annotations

import argparse

import torch

from lit_star.sampling.decoding import DecodeOptions
from lit_star.sampling.filtering import (
    REFERENCE_CFG_SCALE,
    REFERENCE_TOP_K,
    REFERENCE_TOP_P,
    SamplerConfig,
)
from lit_star.sampling.loading import load_star
from lit_star.sampling.modes import Star


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", required=True, help="stage 2 checkpoint: Lightning .ckpt or save_stacked_ar/import-reference dir")
    group.add_argument("--base", help="Qwen2.5-VL directory overriding the recorded one")
    group.add_argument("--vq", help="VQ checkpoint overriding the recorded/bundled one")
    group.add_argument("--vq-flavour", help="VQ flavour of a reference-layout VQ-Model.pt given with --vq")
    group.add_argument("--image-size", type=int, help="generated image side (default: recorded in the checkpoint)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--stack-dtype", choices=("float32", "bfloat16", "float16"),
                       help="dtype of stack, adapter and head at inference (default: as stored, float32)")
    group.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg", type=float, default=REFERENCE_CFG_SCALE, help="guidance weight (1: no unconditional rows)")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--topk", type=int, default=REFERENCE_TOP_K, help="0 disables top-k")
    group.add_argument("--topp", type=float, default=REFERENCE_TOP_P, help="1 disables top-p")
    group.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    group.add_argument("--seed", type=int, default=0, help="sample i uses seed + i unless its record sets one")
    group.add_argument("--batch-size", type=int, default=8, help="samples decoded together (x2 rows with guidance)")
    group.add_argument("--static-cache", action="store_true", help="preallocated KV caches, fixed-shape steps")
    group.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU; implies --static-cache)")
    group.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")


def sampler_from_args(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.topk, top_p=args.topp, greedy=args.greedy)


def decode_options_from_args(args: argparse.Namespace) -> DecodeOptions:
    return DecodeOptions(static_cache=args.static_cache, compile=args.compile, compile_mode=args.compile_mode)


def load_from_args(args: argparse.Namespace) -> Star:
    torch.set_num_threads(args.threads)
    return load_star(
        args.ckpt, base=args.base, vq=args.vq, vq_flavour=args.vq_flavour, image_size=args.image_size,
        device=args.device, stack_dtype=getattr(torch, args.stack_dtype) if args.stack_dtype else None,
    )
