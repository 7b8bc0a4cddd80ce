"""Stage 4 (UnifiedTuneModule): loss = CE + lambda*flow, stop-gradient of the decoder's condition, frozen parts."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from lit_star.modules.diffusion_decoder_module import DiffusionDecoderModule
from lit_star.modules.stacked_ar_module import StackedARModule
from lit_star.modules.unified_tune_module import UnifiedTuneModule
from tests.stage2_fixtures import loader, write_micro_base, write_small_vq
from tests.unit.test_diffusion_decoder_module import TINY_DIT


@pytest.fixture(scope="module")
def frozen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage4")
    return write_micro_base(root / "base"), write_small_vq(root / "vq")


def make_module(frozen_dirs, **overrides) -> UnifiedTuneModule:
    base, vq = frozen_dirs
    stack = StackedARModule(base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2,
                            loss_chunk_size=48, log_images=0)
    decoder = DiffusionDecoderModule(vq_path=str(vq), transformer=TINY_DIT, pixel_space=True,
                                     tiny_text_encoder={"hidden_size": 16, "num_layers": 2}, max_caption_tokens=16,
                                     system_prompt=None)
    return UnifiedTuneModule(stack, decoder, **overrides)


@pytest.mark.parametrize("decoder_codes", ["ground_truth", "predicted"])
def test_loss_is_ce_plus_weighted_flow_and_flow_sends_no_gradient_to_the_stack(frozen_dirs, decoder_codes):
    module = make_module(frozen_dirs, flow_loss_weight=0.5, decoder_codes=decoder_codes)
    module.configure_model()
    batch = next(iter(loader(4, 4)))
    losses = module.losses(batch, 0, dropout=False)
    assert torch.allclose(losses["loss"], losses["ce"] + 0.5 * losses["flow"])
    losses["flow"].backward()
    stack_params = [p for p in module.autoregressive.parameters() if p.requires_grad]
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in stack_params), "flow loss reached the stack"
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in module.diffusion.parameters()), \
        "the DiT got no gradient"


def test_training_keeps_frozen_checksums_and_moves_both_models(frozen_dirs, tmp_path):
    L.seed_everything(0)
    module = make_module(frozen_dirs)
    module.configure_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, loader(8, 4))
    after = module.state_dict()
    assert all(k.startswith(("autoregressive.model.stacked_ar.", "diffusion.decoder.denoiser.")) for k in after)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"autoregressive", "diffusion"}
    module.verify_frozen_weights()
    trainer.save_checkpoint(tmp_path / "stage4.ckpt")
    from lit_star.checkpoints import load_stage4

    loaded = load_stage4(tmp_path / "stage4.ckpt")
    assert loaded.stage3.vq is loaded.stage2.vq


def test_edit_batch_trains_on_target_codes_only_with_the_samplers_source_encoding(frozen_dirs):
    from lit_star.models.edit_source import encode_edit_source, tensor_to_image
    from lit_star.models.sequence_layout import IGNORE_INDEX

    module = make_module(frozen_dirs)
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    batch = {"source_image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
             "target_image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
             "instruction": ["make it red", "remove the circle"], "__key__": ["e0", "e1"]}
    losses = module.losses(batch, 0, dropout=False)
    assert torch.isfinite(losses["loss"])
    ar = module.autoregressive
    target = module.diffusion._codes(batch["target_image"], None)
    sources = ar.edit_sources(batch["source_image"], vq_size=32)
    sampler_source = encode_edit_source(ar.vq, ar.image_processor, tensor_to_image(batch["source_image"][0]), 32,
                                        ar.edit_vit_limits)
    assert torch.equal(sources[0].codes, sampler_source.codes)
    assert torch.equal(sources[0].pixel_values, sampler_source.pixel_values)
    sequences = ar.layout_edit_batch(batch, target, sources, cfg_dropout=False)
    labelled = sequences.labels[sequences.labels != IGNORE_INDEX]
    assert torch.equal(labelled, target.reshape(-1)), "loss only on the target codes"


def _saved_lightning_checkpoint(module, path):
    """What Trainer.save_checkpoint writes of ``module`` (hyper-parameters, state_dict, the module's own entries)."""
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


def test_load_star_samples_edits_under_the_edit_vit_limits_the_checkpoint_trained_with(frozen_dirs, tmp_path):
    from lit_star.checkpoints import STAGE4_CONFIG_KEY
    from lit_star.models.edit_source import VitPixelLimits, merged_patch, tensor_to_image
    from lit_star.sampling.loading import load_star
    from lit_star.sampling.modes import encode_source_image

    base, vq = frozen_dirs
    module = make_module(frozen_dirs)
    factor = merged_patch(module.autoregressive.image_processor)
    # 2 x 2 vision tokens for any source: a grid the base's default limits do not give a 32 px image
    trained = VitPixelLimits(min_pixels=4 * factor * factor, max_pixels=4 * factor * factor, min_side=factor)
    stack = StackedARModule(base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2,
                            loss_chunk_size=48, log_images=0, edit_vit_min_pixels=trained.min_pixels,
                            edit_vit_max_pixels=trained.max_pixels, edit_min_image_side=trained.min_side)
    module = UnifiedTuneModule(stack, module.diffusion)
    module.configure_model()
    checkpoint = _saved_lightning_checkpoint(module, tmp_path / "stage4.ckpt")

    star = load_star(tmp_path / "stage4.ckpt", image_size=32)
    assert star.edit_vit_limits == trained
    source = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    training = module.autoregressive.edit_sources(source[None], vq_size=32)[0]
    sampled = encode_source_image(star, tensor_to_image(source))
    assert torch.equal(sampled.image_grid_thw, training.image_grid_thw)
    assert torch.equal(sampled.pixel_values, training.pixel_values)
    default = encode_source_image(replace(star, edit_vit_limits=VitPixelLimits()), tensor_to_image(source))
    assert not torch.equal(default.image_grid_thw, training.image_grid_thw), "the limits chosen must change the grid"

    # a stage 4 checkpoint written before the limits were recorded loads with the default, as before
    del checkpoint[STAGE4_CONFIG_KEY]["edit_vit_limits"]
    torch.save(checkpoint, tmp_path / "old_stage4.ckpt")
    assert load_star(tmp_path / "old_stage4.ckpt").edit_vit_limits == VitPixelLimits()
    checkpoint[STAGE4_CONFIG_KEY]["edit_vit_limits"] = {"max_pixel": 64}
    torch.save(checkpoint, tmp_path / "bad_stage4.ckpt")
    with pytest.raises(KeyError, match="edit_vit_limits has unknown fields \\['max_pixel'\\]"):
        load_star(tmp_path / "bad_stage4.ckpt")

    # a stage 2 checkpoint: its module's edit_vit_* hyper-parameters
    _saved_lightning_checkpoint(stack, tmp_path / "stage2.ckpt")
    assert load_star(tmp_path / "stage2.ckpt").edit_vit_limits == trained
