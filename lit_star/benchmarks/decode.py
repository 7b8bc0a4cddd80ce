"""Diffusion-decoder sampling speed: DiT step time on a tiny and a mid-size config, guidance rows batched
vs one after another.

    python -m lit_star bench decode                                  # tiny + mid, CPU, ~1 min
    python -m lit_star bench decode --flavours tiny --size 32 --steps 3 --json bench.json
    python -m lit_star bench decode --device cuda --flavours mid lumina2 --size 1024

Models are randomly initialised (timings do not depend on the weights) channel-conditioned decoders in
pixel space with a tiny text encoder, sampled through the same
:func:`~lit_star.sampling.diffusion.sample_latents` the CLI uses. For each flavour it reports the time of one
guided sampling step (3 DiT rows) with the rows batched and with the rows run one after another, and the
ratio; the two must give the same latents (exit 1 otherwise). Clock: CPU time of this process on one CPU
thread (so neighbours on a shared machine do not inflate it), wall time otherwise.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import time

import torch

from lit_star.benchmarks import finish
from lit_star.models.diffusion_decoder import (
    DIT_FLAVOURS,
    DecoderConfig,
    Denoiser,
    DiffusionDecoder,
    build_scheduler,
    build_transformer,
    tiny_text_encoder,
)
from lit_star.sampling.diffusion import GuidanceSettings, initial_noise, sample_latents


def build(flavour: str, codebook_dim: int, device: str) -> DiffusionDecoder:
    tokenizer, encoder = tiny_text_encoder(hidden_size=DIT_FLAVOURS[flavour]["cap_feat_dim"], num_layers=2)
    transformer = dict(DIT_FLAVOURS[flavour], axes_lens=(300, 512, 512))
    config = DecoderConfig(transformer=transformer, latent_channels=4, codebook_dim=codebook_dim,
                           max_caption_tokens=32, system_prompt=None, latent_downsample=1)
    torch.manual_seed(0)
    return DiffusionDecoder(Denoiser(config, build_transformer(config)), encoder, tokenizer).to(device).eval()


def _clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def time_sampling(decoder, batch: int, size: int, steps: int, batched: bool, device: str):
    noise = initial_noise((4, size, size), list(range(batch))).to(device)
    vq = torch.randn(batch, decoder.config.codebook_dim, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = ["a red circle above a blue square"] * batch
    settings = GuidanceSettings(steps + 1, 4.5, 1.05, batched=batched)  # +1: the last, unguided step
    times = []

    def tick(i):
        times.append(_clock(device))

    start = _clock(device)
    latents = sample_latents(decoder, build_scheduler(), noise, prompts, vq=vq, settings=settings,
                             step_callback=tick)
    guided = [b - a for a, b in zip([start, *times[:-2]], times[:-1])]  # steps 0..steps-1 (guided)
    return latents, sorted(guided)[len(guided) // 2]


def bench(
    flavours: list[str] = ["tiny", "mid"],
    batch: int = 2,
    size: int = 16,
    steps: int = 4,
    codebook_dim: int = 16,
    device: str = "cpu",
    threads: int = 1,
    min_ratio: float = 1.5,
    json: str | None = None,
) -> int:
    """Diffusion decoder: DiT guided-step time (tiny, mid), guidance rows batched vs run one after another.

    Args:
        flavours: DiT sizes to run (keys of ``DIT_FLAVOURS``).
        batch: images per step.
        size: latent side (the canvas is 2 x size rows).
        steps: guided steps timed (the median is reported).
        codebook_dim: VQ embedding width fed to the DiT.
        device: cpu, cuda, ...
        threads: torch intra-op threads.
        min_ratio: exit 1 if batched / sequential is below this speed-up.
        json: also write the results here.
    """
    unknown = sorted(set(flavours) - set(DIT_FLAVOURS))
    if unknown:
        print(f"bench decode: unknown flavours {unknown}; choose from {sorted(DIT_FLAVOURS)}", file=sys.stderr)
        return 2
    args = SimpleNamespace(**locals())
    torch.set_num_threads(args.threads)
    results, ok = {"batch": args.batch, "size": args.size, "device": args.device, "flavours": {}}, True
    for flavour in args.flavours:
        decoder = build(flavour, args.codebook_dim, args.device)
        params = sum(p.numel() for p in decoder.denoiser.parameters())
        batched, t_batched = time_sampling(decoder, args.batch, args.size, args.steps, True, args.device)
        sequential, t_sequential = time_sampling(decoder, args.batch, args.size, args.steps, False, args.device)
        same = torch.allclose(batched, sequential, atol=1e-4, rtol=1e-4)
        ratio = t_sequential / t_batched
        results["flavours"][flavour] = {"parameters": params, "step_s_batched": t_batched,
                                        "step_s_sequential": t_sequential, "ratio": ratio, "same_latents": same}
        print(f"{flavour:>8}: {params / 1e6:8.2f}M DiT params | guided step (3 rows x {args.batch}, "
              f"{args.size}x{args.size} latent): batched {t_batched * 1e3:8.1f} ms, sequential "
              f"{t_sequential * 1e3:8.1f} ms, ratio {ratio:.2f}x | same latents: {same}")
        ok = ok and same
    best = max(r["ratio"] for r in results["flavours"].values())
    ok_ratio = best >= args.min_ratio
    return finish(results, args.json, ok and ok_ratio,
                  f"bench decode: batched rows {'differ from sequential ones' if not ok else f'only {best:.2f}x faster'}")
