"""Sampling the stage 3 diffusion decoder: an Euler flow-matching loop with the reference's guidance.

Pure functions over a :class:`~lit_star.models.diffusion_decoder.DiffusionDecoder` and a
``FlowMatchEulerDiscreteScheduler`` (MM-MVR/STAR ``Lumina2InstructPix2PixPipeline.__call__``, NOTES section 2):

* sigmas ``linspace(1, 1/N, N)`` through the scheduler's shift; the DiT gets timestep ``1 - t/1000`` and the
  Euler step (``scheduler.step``) takes ``-prediction`` (the prediction is the velocity x0 - noise);
* text-to-image: three guidance rows (``""`` / no VQ / no source), (``""`` / VQ / source), (prompt / VQ / source)
  combined as ``u + g (t - i) + ig (i - u)``; the last step uses ``t`` alone (``cfg_trunc_ratio=[0, 1]``);
  defaults 40 steps, g 4.5, ig 1.05;
* editing: the three rows get zero VQ, and when VQ codes are given a fourth pass (prompt / VQ / no source)
  adds ``1 (vq - u)``; defaults 50 steps, g 3.0, ig 1.8;
* the guidance rows run as one batch (``batched=False`` runs them one after another, for the benchmark);
* per-sample seeds: sample i's starting noise comes from its own generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from lit_star.models.diffusion_decoder import DiffusionDecoder, vq_map
from lit_star.models.vq import VQModel


@dataclass(frozen=True)
class GuidanceSettings:
    steps: int = 40
    guidance: float = 4.5
    image_guidance: float = 1.05
    vq_guidance: float = 1.0  # editing's fourth pass
    batched: bool = True
    shift: float | None = None  # sampling-time override of the scheduler's shift (None: the trained one)

    def as_dict(self) -> dict:
        return asdict(self)


TEXT_TO_IMAGE = GuidanceSettings(40, 4.5, 1.05)
EDITING = GuidanceSettings(50, 3.0, 1.8)


def sampling_scheduler(scheduler, steps: int, image_tokens: int, shift: float | None = None):
    """A copy of ``scheduler`` set to ``steps`` sigmas ``linspace(1, 1/N, N)`` (shifted by the scheduler, or by
    ``shift`` when given)."""
    import copy

    from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = copy.deepcopy(scheduler)
    if shift is not None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        scheduler.set_shift(shift)
    config = scheduler.config
    mu = None
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu, device="cpu")
    return scheduler


def combine_guidance(uncond, image, text, guidance: float, image_guidance: float) -> torch.Tensor:
    """``u + g (t - i) + ig (i - u)``: g = ig = 1 gives ``t``."""
    return uncond + guidance * (text - image) + image_guidance * (image - uncond)


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _rows(parts: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


@torch.no_grad()
def sample_latents(
    decoder: DiffusionDecoder,
    scheduler,
    noise: torch.Tensor,
    prompts: list[str],
    vq: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    settings: GuidanceSettings = TEXT_TO_IMAGE,
    step_callback=None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, C, H, W) into latents.

    ``vq`` is the VQ map (B, D, H, W) (:func:`vq_map`) or None; ``source`` the source latent for editing (then
    the three rows get zero VQ and ``vq``, when given, enters through the fourth pass).
    """
    denoiser = decoder.denoiser
    b, c, h, w = noise.shape
    device, dtype = noise.device, noise.dtype
    d = decoder.config.codebook_dim
    editing = source is not None
    zero_vq = noise.new_zeros(b, d, h, w)
    vq = zero_vq if vq is None else vq.to(device, dtype)
    zero_source = torch.zeros_like(noise)
    text, text_mask = decoder.encode_prompts(prompts)
    negative, negative_mask = decoder.negative_prompt(b)
    length = max(text.shape[1], negative.shape[1])
    text, negative = text.to(dtype), negative.to(dtype)
    if editing:
        row_vq = [zero_vq, zero_vq, zero_vq]
        row_source = [zero_source, source.to(device, dtype), source.to(device, dtype)]
        vq_pass = bool(vq.abs().sum() > 0)
    else:
        row_vq = [zero_vq, vq, vq]
        row_source = [zero_source, zero_source, zero_source]
        vq_pass = False
    embeds = [negative, negative, text]
    masks = [negative_mask, negative_mask, text_mask]
    assert all(e.shape[1] == length for e in embeds), "captions are padded to max_caption_tokens"
    p = decoder.transformer.config.patch_size
    scheduler = sampling_scheduler(scheduler, settings.steps, (h // p) * (w // p), settings.shift)
    latents = noise
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        timestep = (1 - t / 1000).to(device, dtype).expand(b)
        last = (i + 1) / steps >= 1.0  # cfg_trunc_ratio [0, 1]: only the last step goes without guidance
        if last:
            prediction = denoiser(latents, timestep, text, text_mask, row_vq[2], row_source[2])
            uncond = None
        elif settings.batched:
            out = denoiser(_rows([latents] * 3), timestep.repeat(3), _rows(embeds), _rows(masks), _rows(row_vq),
                           _rows(row_source))
            uncond, image, cond = out.chunk(3)
            prediction = combine_guidance(uncond, image, cond, settings.guidance, settings.image_guidance)
        else:
            uncond, image, cond = (denoiser(latents, timestep, embeds[r], masks[r], row_vq[r], row_source[r])
                                   for r in range(3))
            prediction = combine_guidance(uncond, image, cond, settings.guidance, settings.image_guidance)
        if vq_pass:
            vq_prediction = denoiser(latents, timestep, text, text_mask, vq, zero_source)
            if uncond is None:
                uncond = denoiser(latents, timestep, negative, negative_mask, zero_vq, zero_source)
            prediction = prediction + settings.vq_guidance * (vq_prediction - uncond)
        latents = scheduler.step(-prediction, t, latents, return_dict=False)[0]
        if step_callback is not None:
            step_callback(i)
    return latents


def check_output_size(decoder: DiffusionDecoder, size: int) -> tuple[int, int]:
    """The latent grid for a ``size`` px square output; it must be a multiple of the pixels per DiT patch."""
    multiple = decoder.config.latent_downsample * decoder.transformer.config.patch_size
    if size < multiple or size % multiple:
        raise ValueError(f"output size {size} must be a positive multiple of {multiple} "
                         f"(latent downsampling {decoder.config.latent_downsample} x patch "
                         f"{decoder.transformer.config.patch_size})")
    side = size // decoder.config.latent_downsample
    # The canvas stacks 2 (3 in sequence mode) latent grids along height; rotary tables must reach its rows.
    rows = (3 if decoder.config.conditioning == "sequence" else 2) * side // decoder.transformer.config.patch_size
    axes_lens = decoder.transformer.config.axes_lens
    if rows > axes_lens[1] or side // decoder.transformer.config.patch_size > axes_lens[2]:
        raise ValueError(f"output size {size} needs {rows} rotary rows on the DiT's canvas; its axes_lens "
                         f"{list(axes_lens)} stop at {axes_lens[1]} rows / {axes_lens[2]} columns")
    return side, side


@torch.no_grad()
def decode_codes_with_diffusion(
    decoder: DiffusionDecoder,
    scheduler,
    vq: VQModel,
    codes: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    size: int,
    settings: GuidanceSettings = TEXT_TO_IMAGE,
) -> torch.Tensor:
    """B x h x w codes (+ prompts) -> B x 3 x size x size images in [-1, 1] (any size the DiT's patch allows)."""
    if len(prompts) != codes.shape[0] or len(seeds) != codes.shape[0]:
        raise ValueError(f"{codes.shape[0]} code grids need as many prompts and seeds, got {len(prompts)} / {len(seeds)}")
    latent_size = check_output_size(decoder, size)
    device = next(decoder.denoiser.parameters()).device
    vectors = vq.codebook_vectors(codes.to(vq.quantize.embedding.weight.device)).to(device)
    vq_grid = vq_map(vectors.float(), latent_size)
    noise = initial_noise((decoder.config.latent_channels, *latent_size), seeds).to(device)
    latents = sample_latents(decoder, scheduler, noise, list(prompts), vq=vq_grid, settings=settings)
    return decoder.decode_latents(latents).float().clamp(-1, 1)


@torch.no_grad()
def edit_with_diffusion(
    decoder: DiffusionDecoder,
    scheduler,
    sources: torch.Tensor,
    instructions: list[str],
    seeds: list[int],
    vq: VQModel | None = None,
    codes: torch.Tensor | None = None,
    settings: GuidanceSettings = EDITING,
) -> torch.Tensor:
    """Edit [-1, 1] ``sources`` (B, 3, S, S) with ``instructions``; ``codes`` (the stack's edited codes) add the
    fourth, VQ pass. Sources are encoded at their own size (resize them to the output size first)."""
    size = sources.shape[-1]
    latent_size = check_output_size(decoder, size)
    device = next(decoder.denoiser.parameters()).device
    generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    source_latents = torch.cat([decoder.encode_images(x[None].to(device), g) for x, g in zip(sources, generators)])
    vq_grid = None
    if codes is not None:
        if vq is None:
            raise ValueError("codes need the VQ whose codebook they index")
        vectors = vq.codebook_vectors(codes.to(vq.quantize.embedding.weight.device)).to(device)
        vq_grid = vq_map(vectors.float(), latent_size)
    noise = initial_noise((decoder.config.latent_channels, *latent_size), seeds).to(device)
    latents = sample_latents(decoder, scheduler, noise, list(instructions), vq=vq_grid, source=source_latents,
                             settings=settings)
    return decoder.decode_latents(latents).float().clamp(-1, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]



def diffusion_renderer(decoder: DiffusionDecoder, scheduler, vq: VQModel, size: int,
                       settings: GuidanceSettings = TEXT_TO_IMAGE):
    """``render(codes, prompts, seeds) -> PIL images`` for ``write_generations``: the stage 2 codes decoded by
    the stage 3 decoder at ``size`` px (the VQ must be the one whose codebook the decoder was trained on)."""
    if vq.config.codebook_embed_dim != decoder.config.codebook_dim:
        raise ValueError(f"the decoder reads {decoder.config.codebook_dim}-d codebook vectors, the VQ has "
                         f"{vq.config.codebook_embed_dim}-d ones")
    check_output_size(decoder, size)

    def render(codes: torch.Tensor, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return to_pil(decode_codes_with_diffusion(decoder, scheduler, vq, codes, prompts, seeds, size, settings))

    return render
