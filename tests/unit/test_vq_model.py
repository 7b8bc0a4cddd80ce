"""STAR-VQ model: reference parity, key layout, export round trip, nearest-code search, projector.

    python -m pytest tests/test_vq_model.py -q

Golden files (tests/assets/, produced by running MM-MVR/STAR's ``vq_model.py`` outside this repo):
* ``vq_reference_tiny.safetensors``: a seeded tiny state dict (bf16-representable values), two input
  images, and the reference's codes / pixels / codebook vectors for 1 and 2 attention heads, with and
  without l2-normalised codes; metadata ``config`` holds the tiny ``ModelArgs``.
* ``vq_reference_keys.json``: the reference's state-dict keys and shapes for ``star-vq`` and
  ``vqgan-16384x8`` (built on the meta device).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lit_star.benchmarks.quantize import repeat_codebook_search
from lit_star.cli import main as cli
from lit_star.models.codebook_projector import codebook_image_shape
from lit_star.models.quantizer import _blockwise_squared_norms, nearest_code_indices
from lit_star.models.vq import PROJECTOR_PREFIX, VQ_FLAVOURS, VQConfig, VQModel, parameter_counts, vq_config

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GOLDEN = ASSETS / "vq_reference_tiny.safetensors"


def golden() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tiny reference config, fp32 reference-layout state dict, golden tensors)."""
    with safe_open(str(GOLDEN), "pt") as f:
        config = json.loads(f.metadata()["config"])
    tensors = load_file(str(GOLDEN))
    state = {k[len("weights."):]: v.float() for k, v in tensors.items() if k.startswith("weights.")}
    return config, state, tensors


def seeded_tiny(projector: bool = True) -> VQModel:
    """The ``tiny`` flavour with a projector whose output is not the all-zero init (so codes differ)."""
    torch.manual_seed(0)
    model = VQModel(vq_config("tiny", codebook_projector=projector))
    if projector:
        proj = model.quantize.projector
        for layer in (proj.final_linear, proj.final_modulation[-1]):
            torch.nn.init.normal_(layer.weight, std=0.05)
            torch.nn.init.normal_(layer.bias, std=0.05)
    return model.eval()


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_matches_reference_outputs(tmp_path, heads, l2_norm):
    config, state, tensors = golden()
    checkpoint = tmp_path / "VQ-Model.pt"
    torch.save(state, checkpoint)
    model = VQModel.from_pretrained(checkpoint, VQConfig(**config, attn_num_heads=heads, codebook_l2_norm=l2_norm))
    model.eval()
    tag = f"heads{heads}_l2{int(l2_norm)}"
    images = tensors["images"].float()

    codes = model.encode_to_codes(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, 8, 8)
    assert torch.equal(codes, tensors[f"{tag}.codes"])
    torch.testing.assert_close(model.decode_codes(codes), tensors[f"{tag}.decoded"], rtol=0, atol=1e-5)
    with torch.no_grad():
        out = model(images)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.reconstruction, tensors[f"{tag}.reconstruction"], rtol=0, atol=1e-5)
    vectors = model.codebook_vectors(codes)
    assert vectors.shape == (2, 8, 8, 8)
    torch.testing.assert_close(vectors.reshape(2, 64, 8), tensors[f"{tag}.vectors"], rtol=0, atol=0)


@pytest.mark.parametrize("flavour", ["star-vq", "vqgan-16384x8"])
def test_reference_key_set_and_strict_loading(flavour):
    reference = json.loads((ASSETS / "vq_reference_keys.json").read_text())[flavour]
    with torch.device("meta"):
        model = VQModel(vq_config(flavour, codebook_projector=False))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference
    # A state dict with exactly the reference's keys and shapes loads strictly ...
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in reference.items()}
    model.load_reference_state_dict(state)
    # ... and one with a key missing and an extra one fails, naming both.
    state.pop("encoder.conv_in.weight")
    state["quantize.projector.condition"] = torch.empty(4, device="meta")
    with pytest.raises(KeyError, match=r"encoder\.conv_in\.weight(.|\n)*quantize\.projector\.condition"):
        model.load_reference_state_dict(state, source="broken.pt")


def test_star_vq_parameter_counts_match_paper():
    with torch.device("meta"):
        counts = parameter_counts(VQModel(vq_config("star-vq")))
    # Paper: about 0.4B encoder and 0.6B decoder parameters.
    assert 0.38e9 < counts["encoder"] < 0.43e9
    assert 0.58e9 < counts["decoder"] < 0.63e9
    assert vq_config("star-vq").usage_window == 65537  # reference buffer: K + 1 entries


def test_export_round_trip_folds_projector(tmp_path):
    model = seeded_tiny(projector=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = model.encode_to_codes(images)
    decoded = model.decode_codes(codes)
    assert codes.unique().numel() > 1  # the perturbed projector gives a non-degenerate codebook

    reference_state = model.reference_state_dict()
    assert not any(k.startswith(PROJECTOR_PREFIX) for k in reference_state)
    source = tmp_path / "trained.pt"
    torch.save(reference_state, source)
    out = tmp_path / "export"
    assert cli(["export", "vq", "--ckpt", str(source), "--flavour", "tiny", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"VQ-Model.pt", "model.safetensors", "config.json"}
    assert json.loads((out / "config.json").read_text())["codebook_projector"] is False

    for reloaded in (VQModel.from_pretrained(out), VQModel.from_pretrained(out / "VQ-Model.pt", "tiny")):
        reloaded.eval()
        assert reloaded.quantize.projector is None
        assert torch.equal(reloaded.encode_to_codes(images), codes)
        assert torch.equal(reloaded.decode_codes(codes), decoded)
        again = reloaded.reference_state_dict()
        assert again.keys() == reference_state.keys()
        assert all(torch.equal(again[k], reference_state[k]) for k in again)


def test_export_from_lightning_checkpoint_uses_ema_weights(tmp_path):
    trained, ema = seeded_tiny(projector=True), seeded_tiny(projector=True)
    with torch.no_grad():
        ema.quantize.projector.final_linear.bias.add_(0.5)  # EMA weights differ from the live ones
    state = {**{f"vq.{k}": v for k, v in trained.state_dict().items()},
             **{f"ema_vq.module.{k}": v for k, v in ema.state_dict().items()},
             "ema_vq.n_averaged": torch.tensor(3)}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"flavour": "tiny", "vq_overrides": None}, "state_dict": state}, checkpoint)
    out = tmp_path / "export"
    assert cli(["export", "vq", "--ckpt", str(checkpoint), "--out", str(out), "--format", "safetensors"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    exported = VQModel.from_pretrained(out).reference_state_dict()
    expected = ema.reference_state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_fold_codebook_projector_keeps_codes():
    model = seeded_tiny(projector=True)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = model.encode_to_codes(images)
    vectors = model.codebook_vectors(codes)
    model.fold_codebook_projector()
    assert model.quantize.projector is None and not model.config.codebook_projector
    assert torch.equal(model.encode_to_codes(images), codes)
    assert torch.equal(model.codebook_vectors(codes), vectors)


@pytest.mark.parametrize("chunk_elements", [64, 600, 5000, 1 << 20])
def test_chunked_search_equals_reference_search(chunk_elements):
    gen = torch.Generator().manual_seed(3)
    codebook = torch.randn(301, 24, generator=gen)
    # Exact duplicates far apart (and across tile borders for small tiles): the first index must win.
    codebook[250] = codebook[7]
    codebook[300] = codebook[7]
    z = torch.randn(3, 41, 24, generator=gen)
    z[0, 5] = codebook[7] + 1e-3
    expected = repeat_codebook_search(z, codebook)
    got = nearest_code_indices(z.reshape(-1, 24), codebook, chunk_elements).view(3, 41)
    assert torch.equal(got, expected)
    assert got[0, 5] == 7


def test_rounding_tie_is_broken_like_the_reference():
    # |z|^2 = 2^24, where fp32 spacing is 2: adding it first rounds both distances to 16769024 exactly, so
    # the reference sees a tie and keeps index 0, although code 1 is truly nearer and wins once the
    # constant |z|^2 is dropped. The search must keep the reference's formula and answer 0.
    z = torch.tensor([[4096.0]])
    codebook = torch.tensor([[1.0], [1.0 + 2.0**-12]])
    reference = repeat_codebook_search(z[None], codebook)[0]
    without_z_norm = torch.argmin(torch.sum(codebook**2, dim=1) - 2 * (z @ codebook.t()), dim=1)
    assert reference.item() == 0 and without_z_norm.item() == 1
    for chunk_elements in (1, 1 << 22):
        assert nearest_code_indices(z, codebook, chunk_elements).item() == 0


def test_blockwise_squared_norms_are_bitwise_equal():
    x = torch.randn(1037, 96, generator=torch.Generator().manual_seed(4)) * 3
    for block_bytes in (1, 500, 1 << 19):
        assert torch.equal(_blockwise_squared_norms(x, block_bytes), torch.sum(x**2, dim=1))


def test_training_forward_losses_gradients_and_usage():
    model = seeded_tiny(projector=True).train()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out = model(images)
    q = out.quantizer
    assert out.reconstruction.shape == images.shape and q.codes.shape == (2, 4, 4)
    assert q.codes.dtype == torch.int64
    z = model.quant_conv(model.encoder(images)).detach()
    z_q = model.codebook_vectors(q.codes).permute(0, 3, 1, 2).detach()
    torch.testing.assert_close(q.codebook_loss, torch.mean((z_q - z) ** 2))
    torch.testing.assert_close(q.commitment_loss, 0.25 * torch.mean((z_q - z) ** 2))
    assert q.entropy_loss.item() == 0.0
    # Usage window: 32 codes recorded, usage = distinct codes / codebook size.
    window = model.quantize.codebook_used
    assert torch.equal(window[-32:], q.codes.flatten()) and (window[:-32] == -1).all()
    assert q.codebook_usage == q.codes.unique().numel() / 1024
    assert 1.0 <= q.perplexity.item() <= q.codes.unique().numel() + 1e-4

    (out.reconstruction.abs().mean() + q.codebook_loss + q.commitment_loss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "quantize.projector.final_linear.weight",
                 "quantize.projector.patch_embed.weight", "decoder.conv_out.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.eval()
    before = window.clone()
    with torch.no_grad():
        model(images)
    assert torch.equal(model.quantize.codebook_used, before)  # usage is tracked in training mode only


def test_quantizer_gradient_is_bitwise_repeatable_on_two_threads():
    # Many positions share a few codes, so the codebook gradient sums many terms per row. With
    # codebook[codes] those sums came out in a thread-timing order and differed run to run in their
    # last bits, which stage 1 grew into different codes (docs/curriculum.md, "Why two runs of the same recipes disagreed").
    quantize = seeded_tiny(projector=True).train().quantize
    codebook = quantize.codebook().detach()
    picks = torch.randint(0, 4, (16 * 16 * 16,), generator=torch.Generator().manual_seed(0))
    z = (codebook[picks] + 1e-3 * torch.randn(picks.numel(), codebook.shape[1], generator=torch.Generator().manual_seed(1)))
    z = z.view(16, 16, 16, -1).permute(0, 3, 1, 2).contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(12):
            quantize.zero_grad(set_to_none=True)
            out = quantize(z)
            (out.codebook_loss + out.commitment_loss).backward()
            grads.append(torch.cat([p.grad.flatten() for p in quantize.parameters() if p.grad is not None]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_entropy_loss_when_enabled():
    torch.manual_seed(0)
    model = VQModel(vq_config("tiny", codebook_projector=False, entropy_loss_ratio=0.1)).train()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    out = model(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert torch.isfinite(out.quantizer.entropy_loss) and out.quantizer.entropy_loss.requires_grad


def test_projector_off_has_no_projector_keys():
    model = VQModel(vq_config("tiny", codebook_projector=False))
    assert not any(k.startswith(PROJECTOR_PREFIX) for k in model.state_dict())
    assert any(k.startswith(PROJECTOR_PREFIX) for k in VQModel(vq_config("tiny")).state_dict())


def test_codebook_image_shape():
    assert codebook_image_shape(65536, 8) == (256, 256)
    assert codebook_image_shape(2048, 4) == (64, 32)
    with pytest.raises(ValueError, match="projector_patch_size"):
        codebook_image_shape(1000, 8)


def test_codebook_vectors_shapes_and_bad_codes():
    model = VQModel(vq_config("tiny", codebook_projector=False))
    assert model.codebook_vectors(torch.zeros(2, 3, 4, dtype=torch.long)).shape == (2, 3, 4, 16)
    assert model.codebook_vectors(torch.zeros(2, 12, dtype=torch.int16)).shape == (2, 12, 16)
    with pytest.raises(ValueError, match="codes must lie in"):
        model.codebook_vectors(torch.tensor([[1024]]))
    with pytest.raises(TypeError, match="integer"):
        model.codebook_vectors(torch.zeros(1, 2))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown VQ flavour"):
        vq_config("nope")
    with pytest.raises(ValueError, match="unknown VQConfig keys"):
        vq_config("tiny", codebook_sise=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        vq_config("tiny", ch=48)
    with pytest.raises(FileNotFoundError, match="no VQ checkpoint"):
        VQModel.from_pretrained(tmp_path / "missing.pt", "tiny")
    raw = tmp_path / "raw.pt"
    torch.save(VQModel(vq_config("tiny", codebook_projector=False)).state_dict(), raw)
    with pytest.raises(ValueError, match="pass config="):
        VQModel.from_pretrained(raw)
    with pytest.raises(KeyError, match="shape mismatch quantize.embedding.weight"):
        VQModel.from_pretrained(raw, vq_config("tiny", codebook_embed_dim=8))
    model = VQModel(vq_config("tiny", codebook_projector=False))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode_to_codes(torch.zeros(1, 3, 18, 16))
    assert set(VQ_FLAVOURS) == {"star-vq", "vqgan-16384x8", "tiny"}


def test_quantizer_runs_in_fp32_under_autocast():
    model = seeded_tiny(projector=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 16, 16) * 2 - 1)
        codebook = model.quantize.codebook()
    assert codebook.dtype == torch.float32
    assert out.quantizer.quantized.dtype == torch.float32 and out.quantizer.codebook_loss.dtype == torch.float32


def test_bench_quantize_runs_and_checks_codes(capsys):

    assert cli(["bench", "quantize", "--codebook_size", "256", "--dim", "16", "--batch_sizes", "[1]", "--repeats", "1"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.split("|")[0].strip() == "1" and row.endswith("identical")


@pytest.mark.parametrize("local", [False, True])
def test_local_encoder_codes_depend_on_their_own_patch_only(local):
    # The reference encoder's GroupNorm statistics and attention span the whole image, and its 3x3
    # convolutions let a code see pixels several patches away, so an object moves the latents around it
    # and at the opposite corner. A local encoder's latent at (i, j) must be a function of pixel patch
    # (i, j) alone: a flat image has one latent, and changing one patch changes exactly one latent.
    torch.manual_seed(0)
    vq = VQModel(vq_config("tiny", local_encoder=local)).eval()
    factor = vq.config.downsample_factor
    flat = torch.full((1, 3, 64, 64), 0.9)
    spotted = flat.clone()
    spotted[:, :, 5 * factor : 6 * factor, 7 * factor : 8 * factor] = -0.5  # exactly patch (5, 7)
    with torch.no_grad():
        latent_flat, latent_spotted = (vq.quant_conv(vq.encoder(x))[0] for x in (flat, spotted))
    distinct_flat = torch.unique(latent_flat.flatten(1).T, dim=0).shape[0]
    moved = (latent_flat != latent_spotted).any(0)
    assert (distinct_flat == 1) == local
    if local:
        assert moved.nonzero().tolist() == [[5, 7]]
        assert not any(name.startswith("encoder.") and ".attn" in name for name, _ in vq.named_parameters())
        assert {n for n, _ in vq.named_parameters()} >= {"encoder.norm_out.weight", "decoder.mid.1.q.weight"}
    else:
        assert moved[4:7, 6:9].all() and moved[0, 0]


def test_local_encoder_vq_refuses_the_reference_export(tmp_path, capsys):
    torch.manual_seed(0)
    local = VQModel(vq_config("tiny", local_encoder=True)).eval()
    source = local.save_pretrained(tmp_path / "local")
    assert cli(["export", "vq", "--ckpt", str(source), "--out", str(tmp_path / "reference")]) == 2
    assert "local encoder" in capsys.readouterr().err
    assert not (tmp_path / "reference" / "VQ-Model.pt").exists()
    assert cli(["export", "vq", "--ckpt", str(source), "--out", str(tmp_path / "st"), "--format", "safetensors"]) == 0
    reloaded = VQModel.from_pretrained(tmp_path / "st").eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert reloaded.config.local_encoder and torch.equal(reloaded.encode_to_codes(images), local.encode_to_codes(images))
