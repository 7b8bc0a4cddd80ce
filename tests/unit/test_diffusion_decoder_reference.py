"""Stage 3 against the reference layout: strict import of ``diffusion_decoder.*``, identical DiT output, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage3_fixtures import (  # noqa: E402
    CODE_DIM,
    LATENT,
    ReferenceDecoderTree,
    reference_checkpoint_state,
    reference_dit_forward,
    write_tiny_lumina,
)

from lit_star.checkpoints import DecoderSpec, build_diffusion_decoder, export_decoder_reference, import_reference_decoder  # noqa: E402
from lit_star.models.diffusion_decoder import load_decoder, save_decoder, vq_map  # noqa: E402
from lit_star.models.reference_format import DIFFUSION_DECODER_PREFIX  # noqa: E402


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    return write_tiny_lumina(tmp_path_factory.mktemp("lumina") / "Lumina-Image-2.0")


@pytest.fixture(scope="module")
def reference(lumina):
    tree = ReferenceDecoderTree(lumina).eval()
    state = reference_checkpoint_state(tree)
    return tree, {k[len(DIFFUSION_DECODER_PREFIX):]: v for k, v in state.items()}


def test_reference_tree_loads_strictly_and_gives_the_reference_dit_output(lumina, reference):
    tree, state = reference
    decoder, _ = import_reference_decoder(state, lumina, CODE_DIM, "fixture")
    assert decoder.transformer.config.out_channels == LATENT
    generator = torch.Generator().manual_seed(0)
    noisy, source = torch.randn(2, LATENT, 8, 8, generator=generator), torch.randn(2, LATENT, 8, 8, generator=generator)
    vq = vq_map(torch.randn(2, 16, CODE_DIM, generator=generator), (8, 8))
    caption = torch.randn(2, 10, 16, generator=generator)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :7], mask[1, :10] = 1, 1
    timestep = torch.tensor([0.25, 0.9])
    # The reference's training forward: [noisy | vq] over [source | vq] along height, top half kept.
    canvas = torch.cat([torch.cat([noisy, vq], 1), torch.cat([source, vq], 1)], dim=2)
    expected = reference_dit_forward(tree.transformer, canvas, timestep, caption, mask)[:, :, :8]
    with torch.no_grad():
        ours = decoder.denoiser(noisy, timestep, caption, mask, vq, source)
    assert (ours - expected).abs().max() <= 1e-5


def test_missing_and_unexpected_keys_are_named(lumina, reference):
    _, state = reference
    broken = dict(state)
    del broken["transformer.ori_inp_refiner.2.weight"]
    broken["transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as error:
        import_reference_decoder(broken, lumina, CODE_DIM, "fixture")
    assert "transformer.ori_inp_refiner.2.weight" in str(error.value) and "transformer.extra.weight" in str(error.value)
    with pytest.raises(KeyError, match="shape mismatch"):
        import_reference_decoder(state, lumina, CODE_DIM * 2, "fixture")  # x_embedder for another codebook


def test_export_round_trip_is_bit_identical(lumina, reference, tmp_path):
    _, state = reference
    decoder, scheduler = import_reference_decoder(state, lumina, CODE_DIM, "fixture")
    exported = export_decoder_reference(decoder)["state_dict"]
    assert exported.keys() == {DIFFUSION_DECODER_PREFIX + k for k in state}
    for key, value in state.items():
        assert torch.equal(exported[DIFFUSION_DECODER_PREFIX + key], value), key
    save_decoder(decoder, tmp_path / "saved", dict(scheduler.config))
    reloaded, reloaded_scheduler = load_decoder(tmp_path / "saved")
    assert reloaded_scheduler.config.shift == 6.0
    for key, value in decoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_lumina_directory_initialises_the_dit_with_both_embedder_modes(lumina):
    from diffusers import Lumina2Transformer2DModel

    stock = Lumina2Transformer2DModel.from_pretrained(lumina / "transformer").eval()
    decoders = {mode: build_diffusion_decoder(DecoderSpec(lumina_path=str(lumina), embedder_init=mode), CODE_DIM)[0]
                for mode in ("scatter", "reference")}
    latents, caption = torch.randn(1, LATENT, 8, 8), torch.randn(1, 10, 16)
    mask = torch.ones(1, 10, dtype=torch.long)
    wide = torch.cat([latents, torch.zeros(1, CODE_DIM, 8, 8)], 1)
    with torch.no_grad():
        expected = stock(latents, torch.tensor([0.5]), caption, mask, return_dict=False)[0]
        outputs = {mode: d.transformer(wide, torch.tensor([0.5]), caption, mask, return_dict=False)[0]
                   for mode, d in decoders.items()}
    assert (outputs["scatter"] - expected).abs().max() <= 1e-5
    assert (outputs["reference"] - expected).abs().max() > 1e-3
    assert decoders["scatter"].config.vae_shift == pytest.approx(0.1)
    assert decoders["scatter"].config.latent_downsample == 2


def test_import_reference_with_lumina_loads_the_decoder_strictly(lumina, tmp_path):
    """A whole released-layout checkpoint: `import-reference --lumina` writes a decoder that load_stage3 reads."""
    from test_reference_format import VQ_FLAVOUR, build_model, write_reference

    from lit_star.checkpoints import load_stage3
    from lit_star.commands.import_reference import import_reference
    from lit_star.models.diffusion_decoder import decoder_key_to_reference
    from lit_star.models.reference_format import export_reference_state_dict
    from lit_star.models.tokenizer import train_qwen2_tokenizer
    from lit_star.models.vq import VQModel, vq_config

    torch.manual_seed(3)
    vq = VQModel(vq_config(VQ_FLAVOUR, codebook_projector=False)).eval()
    model = build_model(train_qwen2_tokenizer(["a red circle"] * 20, vocab_size=320, min_frequency=1), vq)
    tree = ReferenceDecoderTree(lumina, code_dim=vq.config.codebook_embed_dim)
    decoder_state = {k: v.detach().clone() for k, v in tree.state_dict().items()}
    ckpt, base_dir = write_reference(tmp_path, model, vq,
                                     export_reference_state_dict(model, vq.reference_state_dict(), decoder_state))
    assert import_reference(str(ckpt), str(base_dir), str(tmp_path / "out"), vq_config=VQ_FLAVOUR, lumina=str(lumina)) == 0
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["diffusion_decoder"]["loaded_strictly"] and report["diffusion_decoder"]["keys"] == len(decoder_state)
    loaded = load_stage3(tmp_path / "out" / "diffusion_decoder")
    assert loaded.vq is not None
    for key, value in loaded.decoder.state_dict().items():
        assert torch.equal(decoder_state[decoder_key_to_reference(key)], value), key
