"""Stage 3 models: the conditioned Lumina2 DiT, its x_embedder initialisations, conditioning modes, flow matching."""

from __future__ import annotations

import pytest
import torch
from diffusers import Lumina2Transformer2DModel

from lit_star.models.diffusion_decoder import (
    DIT_FLAVOURS,
    ConfigError,
    DecoderConfig,
    Denoiser,
    DiffusionDecoder,
    build_scheduler,
    build_transformer,
    conditioning_dropout,
    flow_matching_loss,
    insert_after_caption,
    noisy_latents,
    sample_training_sigmas,
    tiny_text_encoder,
    transformer_from_lumina,
    vq_map,
    widen_x_embedder,
)

LATENT, CODE_DIM = 4, 8


def tiny_config(**overrides) -> DecoderConfig:
    values = dict(transformer=dict(DIT_FLAVOURS["tiny"]), latent_channels=LATENT, codebook_dim=CODE_DIM,
                  max_caption_tokens=12, system_prompt=None, latent_downsample=1)
    values.update(overrides)
    return DecoderConfig(**values)


@pytest.fixture(scope="module")
def text_parts():
    return tiny_text_encoder(hidden_size=32, num_layers=2)


def tiny_decoder(text_parts, **overrides) -> DiffusionDecoder:
    tokenizer, encoder = text_parts
    config = tiny_config(**overrides)
    return DiffusionDecoder(Denoiser(config, build_transformer(config)), encoder, tokenizer).eval()


def stock_lumina(seed: int = 0) -> Lumina2Transformer2DModel:
    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(in_channels=LATENT, **DIT_FLAVOURS["tiny"]).eval()
    with torch.no_grad():  # stock init leaves some output weights small; make every path matter
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def caption(batch: int, length: int = 12, features: int = 32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : 5 + row] = 1
    return torch.randn(batch, length, features, generator=generator), mask


def test_zero_vq_parity_with_stock_lumina_and_the_reference_quirk():
    stock = stock_lumina()
    latents = torch.randn(2, LATENT, 8, 8)
    embeds, mask = caption(2)
    timestep = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = stock(latents, timestep, embeds, mask, return_dict=False)[0]
        wide_input = torch.cat([latents, torch.zeros(2, CODE_DIM, 8, 8)], 1)
        ours = transformer_from_lumina(stock, tiny_config(), "scatter").eval()
        got = ours(wide_input, timestep, embeds, mask, return_dict=False)[0]
        quirk = transformer_from_lumina(stock, tiny_config(), "reference").eval()
        got_quirk = quirk(wide_input, timestep, embeds, mask, return_dict=False)[0]
    assert ours.config.out_channels == LATENT and ours.norm_out.linear_2.out_features == 4 * LATENT
    assert (got - expected).abs().max() <= 1e-5
    # The reference copies the 4 * C old columns into the first ones, ignoring the (py, px, C) patch layout.
    assert (got_quirk - expected).abs().max() > 1e-2
    assert torch.equal(quirk.x_embedder.weight[:, : 4 * LATENT], stock.x_embedder.weight)


def test_widen_x_embedder_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="copy"):
        widen_x_embedder(torch.nn.Linear(16, 8), 12, 4, 2, "copy")


def test_refiner_replaces_the_condition_tokens_without_residual(text_parts):
    decoder = tiny_decoder(text_parts)
    dit = decoder.transformer
    torch.nn.init.normal_(dit.ori_inp_refiner[2].weight, std=0.5)
    seen = {}
    dit.ori_inp_refiner.register_forward_hook(lambda m, a, o: seen.update(refiner_in=a[0], refiner_out=o))
    dit.layers[0].register_forward_pre_hook(lambda m, a: seen.update(joint=a[0]))
    embeds, mask = torch.randn(1, 12, 32), torch.ones(1, 12, dtype=torch.long)
    with torch.no_grad():
        decoder.velocity(torch.randn(1, LATENT, 8, 8), torch.tensor([0.5]), embeds, mask,
                         torch.randn(1, CODE_DIM, 8, 8), torch.randn(1, LATENT, 8, 8))
    tokens = 16  # 8 x 8 latent, patch 2
    assert seen["refiner_in"].shape[1] == tokens
    assert torch.equal(seen["joint"][0, 12 + tokens: 12 + 2 * tokens], seen["refiner_out"][0])


@pytest.mark.parametrize("mode", ["channel", "sequence", "text"])
def test_every_conditioning_mode_reads_the_vq(text_parts, mode):
    decoder = tiny_decoder(text_parts, conditioning=mode)
    with torch.no_grad():
        torch.nn.init.normal_(decoder.transformer.x_embedder.weight, std=0.3)
    embeds, mask = caption(2)
    noisy = torch.randn(2, LATENT, 8, 8)
    codes = torch.randn(2, 16, CODE_DIM)  # a 4 x 4 code grid, resized to the 8 x 8 latent
    with torch.no_grad():
        vq = vq_map(codes, (8, 8))
        out = decoder.velocity(noisy, torch.tensor([0.2, 0.7]), embeds, mask, vq)
        out_zero = decoder.velocity(noisy, torch.tensor([0.2, 0.7]), embeds, mask, torch.zeros_like(vq))
    assert vq.shape == (2, CODE_DIM, 8, 8)
    assert out.shape == noisy.shape
    assert (out - out_zero).abs().max() > 1e-4
    expected_in = LATENT + CODE_DIM if mode == "channel" else LATENT
    assert decoder.transformer.config.in_channels == expected_in
    assert (decoder.denoiser.vq_projection is None) == (mode == "channel")


def test_vq_map_is_bilinear_without_corner_alignment():
    codes = torch.randn(1, 9, CODE_DIM)
    grid = codes.view(1, 3, 3, CODE_DIM).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    assert torch.equal(vq_map(codes, (6, 6)), expected)


def test_insert_after_caption_keeps_each_rows_real_tokens_first():
    embeds, mask = caption(2, length=8, features=3)
    extra = torch.randn(2, 2, 3)
    out, new_mask = insert_after_caption(embeds, mask, extra)
    for row in range(2):
        n = int(mask[row].sum())
        assert torch.equal(out[row, :n], embeds[row, :n])
        assert torch.equal(out[row, n: n + 2], extra[row])
        assert int(new_mask[row].sum()) == n + 2 and bool(new_mask[row, : n + 2].all())


def test_prompt_encoding_right_pads_and_uses_second_to_last_hidden_state(text_parts):
    decoder = tiny_decoder(text_parts, system_prompt="SYS")
    tokenizer, encoder = text_parts
    embeds, mask = decoder.encode_prompts(["a red circle"])
    ids = tokenizer(["SYS <Prompt Start> a red circle"], return_tensors="pt").input_ids
    assert embeds.shape == (1, 12, 32) and int(mask.sum()) == min(ids.shape[1], 12)
    assert bool(mask[0, : int(mask.sum())].all())  # right padding
    with torch.no_grad():
        hidden = encoder(ids[:, :12], output_hidden_states=True).hidden_states[-2]
    n = int(mask.sum())
    assert torch.allclose(embeds[0, :n], hidden[0, :n], atol=1e-5)
    negative, negative_mask = decoder.negative_prompt(3)
    assert negative.shape[0] == 3 and int(negative_mask[0].sum()) <= 1  # "" without the system prompt


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="'channels'"):
        tiny_config(conditioning="channels")
    with pytest.raises(ConfigError, match="in_channels"):
        tiny_config(transformer=dict(DIT_FLAVOURS["tiny"], in_channels=3))


def test_flow_matching_loss_matches_a_hand_computation():
    scheduler = build_scheduler(shift=3.0)
    generator = torch.Generator().manual_seed(0)
    sigmas, timesteps = sample_training_sigmas(scheduler.sigmas, scheduler.timesteps, 4, generator=generator)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (4,), generator=torch.Generator().manual_seed(0)))
    index = (u * 1000).long()
    assert torch.equal(sigmas, scheduler.sigmas[index]) and torch.equal(timesteps, scheduler.timesteps[index])
    assert torch.allclose(timesteps / 1000, sigmas)
    x0, noise, prediction = torch.randn(3, 4, 2, 2, 2).unbind(0)
    assert torch.allclose(noisy_latents(x0, noise, sigmas), sigmas.view(-1, 1, 1, 1) * noise
                          + (1 - sigmas.view(-1, 1, 1, 1)) * x0)
    loss = flow_matching_loss(prediction, x0, noise, sigmas, "logit_normal")
    assert torch.allclose(loss, ((prediction - (x0 - noise)) ** 2).mean())
    weighted = flow_matching_loss(prediction, x0, noise, sigmas, "sigma_sqrt")
    by_hand = torch.stack([(sigmas[i] ** -2 * (prediction[i] - (x0[i] - noise[i])) ** 2).mean() for i in range(4)])
    assert torch.allclose(weighted, by_hand.mean())


def test_conditioning_dropout_frequencies():
    p = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    masks = conditioning_dropout(p, uncondition_prob=0.1, vq_drop_prob=0.05)
    assert abs(masks.prompt.float().mean() - 0.2) < 0.005
    assert abs(masks.vq.float().mean() - 0.05) < 0.005
    assert abs(masks.source.float().mean() - 0.2) < 0.005
    # The three draws share p, as in the reference: source drops exactly in [u, 3u).
    assert bool((masks.source == ((p >= 0.1) & (p < 0.3))).all())
    assert bool(conditioning_dropout(p[:10], 0.1, 0.05, is_edit=True).vq.all())
