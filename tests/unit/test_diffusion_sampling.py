"""Stage 3 sampling: the Euler loop, the reference's guidance, per-sample seeds, output sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_star.models.diffusion_decoder import (  # noqa: E402
    DecoderConfig,
    Denoiser,
    DiffusionDecoder,
    build_scheduler,
    build_transformer,
    tiny_text_encoder,
)
from lit_star.sampling.diffusion import (  # noqa: E402
    EDITING,
    TEXT_TO_IMAGE,
    GuidanceSettings,
    check_output_size,
    combine_guidance,
    decode_codes_with_diffusion,
    edit_with_diffusion,
    initial_noise,
    sample_latents,
    sampling_scheduler,
)

DIT = dict(patch_size=2, hidden_size=32, num_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
           multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 32, 32), cap_feat_dim=16)


@pytest.fixture(scope="module")
def decoder():
    tokenizer, encoder = tiny_text_encoder(hidden_size=16, num_layers=2)
    config = DecoderConfig(transformer=DIT, latent_channels=3, codebook_dim=4, max_caption_tokens=12,
                           system_prompt=None, latent_downsample=1)
    torch.manual_seed(0)
    model = DiffusionDecoder(Denoiser(config, build_transformer(config)), encoder, tokenizer).eval()
    with torch.no_grad():  # make the VQ channels and the refiner matter
        torch.nn.init.normal_(model.transformer.x_embedder.weight, std=0.2)
        torch.nn.init.normal_(model.transformer.ori_inp_refiner[2].weight, std=0.2)
    return model


def test_defaults_are_the_references():
    assert (TEXT_TO_IMAGE.steps, TEXT_TO_IMAGE.guidance, TEXT_TO_IMAGE.image_guidance) == (40, 4.5, 1.05)
    assert (EDITING.steps, EDITING.guidance, EDITING.image_guidance, EDITING.vq_guidance) == (50, 3.0, 1.8, 1.0)


def test_sigmas_are_a_shifted_linspace():
    scheduler = sampling_scheduler(build_scheduler(shift=3.0), 4, 16)
    plain = torch.linspace(1.0, 0.25, 4)
    assert torch.allclose(scheduler.sigmas[:-1], 3 * plain / (1 + 2 * plain))
    assert float(scheduler.sigmas[-1]) == 0.0


def test_one_euler_step_is_the_closed_form(decoder):
    noise = initial_noise((3, 8, 8), [5])
    vq = torch.randn(1, 4, 8, 8)
    out = sample_latents(decoder, build_scheduler(shift=3.0), noise, ["a red circle"], vq=vq,
                         settings=GuidanceSettings(steps=1))
    text, mask = decoder.encode_prompts(["a red circle"])
    with torch.no_grad():
        velocity = decoder.denoiser(noise, torch.zeros(1), text, mask, vq, torch.zeros_like(noise))
    # sigma 1 -> 0 with dx/dsigma = -velocity: x0 = noise + velocity
    assert torch.allclose(out, noise + velocity, atol=1e-6)


def test_unit_guidance_gives_the_conditional_prediction(decoder):
    noise = initial_noise((3, 8, 8), [1, 2])
    vq = torch.randn(2, 4, 8, 8)
    prompts = ["a red circle", "two blue squares"]
    scheduler = build_scheduler(shift=2.0)
    guided = sample_latents(decoder, scheduler, noise, prompts, vq=vq, settings=GuidanceSettings(3, 1.0, 1.0))
    text, mask = decoder.encode_prompts(prompts)
    schedule = sampling_scheduler(scheduler, 3, 16)
    latents = noise
    with torch.no_grad():
        for t in schedule.timesteps:
            velocity = decoder.denoiser(latents, (1 - t / 1000).expand(2), text, mask, vq, torch.zeros_like(noise))
            latents = schedule.step(-velocity, t, latents, return_dict=False)[0]
    assert torch.allclose(guided, latents, atol=1e-5)
    u, i, t = torch.randn(3, 5)
    assert torch.allclose(combine_guidance(u, i, t, 1.0, 1.0), t, atol=1e-6)
    assert torch.allclose(combine_guidance(u, i, t, 4.5, 1.05), u + 4.5 * (t - i) + 1.05 * (i - u))


def test_batched_rows_equal_sequential_rows_and_seeds_are_per_sample(decoder):
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    vq = torch.randn(2, 4, 8, 8)
    scheduler = build_scheduler(shift=2.0)
    batched = sample_latents(decoder, scheduler, initial_noise((3, 8, 8), seeds), prompts, vq=vq,
                             settings=GuidanceSettings(3, 4.5, 1.05, batched=True))
    sequential = sample_latents(decoder, scheduler, initial_noise((3, 8, 8), seeds), prompts, vq=vq,
                                settings=GuidanceSettings(3, 4.5, 1.05, batched=False))
    alone = sample_latents(decoder, scheduler, initial_noise((3, 8, 8), seeds[1:]), prompts[1:], vq=vq[1:],
                           settings=GuidanceSettings(3, 4.5, 1.05))
    assert torch.allclose(batched, sequential, atol=1e-5)
    assert torch.allclose(batched[1:], alone, atol=1e-5)


def test_editing_adds_the_vq_pass_and_sizes_are_checked(decoder):
    from stage2_fixtures import VQ_OVERRIDES

    from lit_star.models.vq import VQModel, vq_config

    vq = VQModel(vq_config("tiny", **dict(VQ_OVERRIDES, codebook_embed_dim=4))).eval()
    codes = torch.randint(0, 64, (2, 4, 4))
    images = decode_codes_with_diffusion(decoder, build_scheduler(), vq, codes, ["a", "b"], [0, 1], 16,
                                         GuidanceSettings(2))
    assert images.shape == (2, 3, 16, 16) and float(images.abs().max()) <= 1.0
    sources = torch.rand(1, 3, 8, 8) * 2 - 1
    plain = edit_with_diffusion(decoder, build_scheduler(), sources, ["make it red"], [0], settings=GuidanceSettings(2))
    with_vq = edit_with_diffusion(decoder, build_scheduler(), sources, ["make it red"], [0], vq=vq,
                                  codes=codes[:1, :2, :2], settings=GuidanceSettings(2))
    assert plain.shape == with_vq.shape == (1, 3, 8, 8) and not torch.allclose(plain, with_vq)
    assert check_output_size(decoder, 12) == (12, 12)
    with pytest.raises(ValueError, match="multiple of 2"):
        check_output_size(decoder, 9)


def test_sampling_shift_override():
    scheduler = build_scheduler(shift=1.0)
    shifted = sampling_scheduler(scheduler, 4, 16, shift=6.0)
    plain = torch.linspace(1.0, 0.25, 4)
    assert torch.allclose(shifted.sigmas[:-1], 6 * plain / (1 + 5 * plain))
    assert scheduler.shift == 1.0  # the caller's scheduler is untouched
