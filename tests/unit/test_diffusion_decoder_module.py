"""Stage 3 LightningModule: frozen parts, resume, dropout wiring, config errors before weights load, recipes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage2_fixtures import loader, write_small_vq  # noqa: E402

from lit_star.checkpoints import FROZEN_CHECKSUMS_KEY, STAGE3_CONFIG_KEY, FrozenWeightsChangedError  # noqa: E402
from lit_star.models.diffusion_decoder import ConfigError  # noqa: E402
from lit_star.modules.diffusion_decoder_module import DiffusionDecoderModule  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_DIT = dict(patch_size=2, hidden_size=32, num_layers=1, num_refiner_layers=1, num_attention_heads=2,
                num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 160, 160), cap_feat_dim=16)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return write_small_vq(tmp_path_factory.mktemp("stage3") / "vq")


def make_module(vq_dir, **overrides) -> DiffusionDecoderModule:
    kwargs = dict(vq_path=str(vq_dir), transformer=TINY_DIT, pixel_space=True,
                  tiny_text_encoder={"hidden_size": 16, "num_layers": 2}, max_caption_tokens=16,
                  system_prompt=None, learning_rate=1e-3)
    return DiffusionDecoderModule(**{**kwargs, **overrides})


def make_trainer(max_steps: int, tmp_path: Path | None = None, callbacks=()) -> L.Trainer:
    if tmp_path is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0,
                                                 every_n_train_steps=1)]
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                     callbacks=list(callbacks), limit_val_batches=0)


class CaptureStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_training_changes_only_the_denoiser_and_resume_continues_exactly(vq_dir, tmp_path):
    L.seed_everything(0)
    losses = Losses()
    module = make_module(vq_dir)
    module.configure_model()
    frozen_before = {k: v.clone() for k, v in module.decoder.text_encoder.state_dict().items()}
    # One epoch is 2 steps, so step 3 is the first batch of epoch 1 in the resumed and the uninterrupted run.
    make_trainer(3, callbacks=[losses]).fit(module, loader(8, 4))
    assert all(torch.equal(v, module.decoder.text_encoder.state_dict()[k]) for k, v in frozen_before.items())
    assert not module.decoder.text_encoder.training and not module.vq.training

    L.seed_everything(0)
    make_trainer(2, tmp_path).fit(make_module(vq_dir), loader(8, 4))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("decoder.denoiser.") for k in last["state_dict"]), "only trainable weights"
    assert set(last[FROZEN_CHECKSUMS_KEY]) == {"vq", "text_encoder"}
    assert last[STAGE3_CONFIG_KEY]["decoder"]["conditioning"] == "channel"
    L.seed_everything(123)  # the resumed run must not depend on the seed
    capture, resumed = CaptureStart(), Losses()
    trainer = make_trainer(3, callbacks=[capture, resumed])
    trainer.fit(make_module(vq_dir), loader(8, 4), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert capture.global_step == 2 and trainer.global_step == 3
    for name, value in last["state_dict"].items():
        assert torch.equal(capture.weights[name], value), name
    assert resumed.values == pytest.approx(losses.values[2:], abs=0, rel=0)  # bit-identical third step


def test_changed_frozen_weights_refuse_to_save(vq_dir, tmp_path):
    module = make_module(vq_dir)
    trainer = make_trainer(1)
    trainer.fit(module, loader(4, 4))
    with torch.no_grad():
        next(module.decoder.text_encoder.parameters()).add_(1e-3)
    with pytest.raises(FrozenWeightsChangedError, match="text_encoder"):
        trainer.save_checkpoint(tmp_path / "tampered.ckpt")


def test_dropout_replaces_prompt_vq_and_source_as_drawn(vq_dir, monkeypatch):
    module = make_module(vq_dir, uncondition_prob=0.5, vq_drop_prob=1.0)
    module.configure_model()
    batch = next(iter(loader(4, 4)))
    inputs = module.unpack(batch, 0)
    seen = {}
    original = module.decoder.denoiser.forward

    def spy(noisy, timestep, embeds, mask, vq, source=None):
        seen.update(embeds=embeds, vq=vq)
        return original(noisy, timestep, embeds, mask, vq, source)

    monkeypatch.setattr(module.decoder.denoiser, "forward", spy)
    module.flow_loss(inputs, dropout=True)
    assert float(seen["vq"].abs().max()) == 0.0  # p <= 1 always
    negative, _ = module.decoder.negative_prompt(4)
    # p < 2u = 1 always: every prompt is the empty one.
    assert torch.allclose(seen["embeds"], negative)
    module.flow_loss(inputs, dropout=False)
    assert float(seen["vq"].abs().max()) > 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(conditioning="channels"), "'channels'"),
        (dict(embedder_init="copy"), "embedder_init"),
        (dict(transformer="huge"), "huge"),
        (dict(pixel_space=False), "vae_path"),
        (dict(weighting_scheme="sd3"), "weighting_scheme"),
        (dict(lumina_path="/nonexistent/lumina"), "/nonexistent/lumina/transformer"),
    ],
)
def test_config_errors_are_named_before_any_weights_load(overrides, message, monkeypatch):
    import lit_star.modules.diffusion_decoder_module as module_file

    monkeypatch.setattr(module_file, "load_vq", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ConfigError, match=message):
        make_module(Path("/nonexistent/vq"), **overrides)


def test_config_error_in_a_recipe_is_named_by_the_cli(tmp_path, capsys):
    from lit_star.training import StarCLI

    recipe = REPO / "recipes" / "shapes" / "stage3_diffusion_decoder.yaml"
    with pytest.raises((ConfigError, SystemExit)) as error:
        StarCLI(args=["--config", str(recipe), "--model.init_args.conditioning", "channels",
                      "--trainer.default_root_dir", str(tmp_path)], run=False)
    text = str(error.value) + capsys.readouterr().err
    assert "channels" in text


def test_pre_extracted_vae_latents_give_the_on_the_fly_loss(vq_dir, tmp_path):
    """tokenize --vq --vae writes codes and the VAE posterior; training on them matches encoding on the fly."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image
    from stage3_fixtures import write_tiny_lumina

    from lit_star.commands.tokenize import tokenize
    from lit_star.data import ImageTextDataModule

    lumina = write_tiny_lumina(tmp_path / "lumina")
    (tmp_path / "raw").mkdir()
    with wds.TarWriter(str(tmp_path / "raw" / "train-000000.tar")) as sink:
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            sink.write({"__key__": f"s{i}", "png": buffer.getvalue(), "txt": f"caption {i}".encode()})
    assert tokenize(vq=str(vq_dir), vae=str(lumina / "vae"), shards=str(tmp_path / "raw" / "*.tar"),
                    out=str(tmp_path / "tok")) == 0
    data = ImageTextDataModule(train_shards=str(tmp_path / "tok" / "*.tar"), resolution=32, codes_key="codes.npy",
                               latents_key="latents.npy", meta_key=None, batch_size=4, shuffle_buffer=0)
    batch = next(iter(data.train_dataloader()))
    assert batch["latents"].shape == (4, 8, 16, 16) and batch["codes"].shape == (4, 8, 8)
    module = make_module(vq_dir, pixel_space=False, vae_path=str(lumina / "vae"))
    module.configure_model()
    assert set(module.frozen_checksums) == {"vq", "text_encoder", "vae"}
    with torch.no_grad():
        stored = module.flow_loss(module.unpack(batch, 0), dropout=False)
        fresh_batch = {k: v for k, v in batch.items() if k not in ("latents", "codes")}
        fresh = module.flow_loss(module.unpack(fresh_batch, 0), dropout=False)
    assert torch.allclose(stored, fresh, rtol=2e-2), (stored, fresh)  # float16 storage of the posterior


@pytest.mark.parametrize("override, mode", [(None, "channel"), ("concat_sequence", "sequence"),
                                            ("concat_text", "text")])
def test_paper_recipes_parse_with_table_9_values(override, mode, tmp_path):
    from stage3_fixtures import write_tiny_lumina

    from lit_star.training import StarCLI

    lumina = write_tiny_lumina(tmp_path / "lumina")
    recipes = REPO / "recipes" / "stage3_diffusion_decoder"
    configs = [recipes / "lumina2.yaml"] + ([recipes / f"{override}.yaml"] if override else [])
    args = [arg for config in configs for arg in ("--config", str(config))]
    cli = StarCLI(args=[*args, "--model.init_args.lumina_path", str(lumina), "--trainer.accelerator", "cpu",
                        "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.precision", "32-true",
                        "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    hp = cli.model.hparams
    assert hp.conditioning == mode and hp.learning_rate == 1e-4 and hp.lr_schedule == "constant"
    assert hp.global_batch_size == 2048 and cli.trainer.max_steps == 4000 and cli.datamodule.resolution == 512
    assert cli.datamodule.batch_size * 8 * 8 * cli.trainer.accumulate_grad_batches == 2048


def test_lumina_image_2_dit_has_its_size_on_meta():
    from lit_star.models.diffusion_decoder import LUMINA2_DIT, DecoderConfig, build_transformer

    with torch.device("meta"):
        dit = build_transformer(DecoderConfig(transformer=LUMINA2_DIT))
    assert dit.config.in_channels == 528 and dit.norm_out.linear_2.out_features == 4 * 16
    assert sum(p.numel() for p in dit.parameters()) == pytest.approx(2.6e9, rel=0.05)
