"""Stage 1 training side: VQ losses, metrics, VQModule (GAN, EMA, resumption), tokenize job, recipes.

    OMP_NUM_THREADS=1 python -m pytest tests/test_vq_module.py -q
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from torch import nn

from lit_star.checkpoints import load_vq
from lit_star.cli import main as cli
from lit_star.worlds.shapes.world import BACKGROUNDS, COLORS, SHAPES, Scene, WorldObject, render_scene
from lit_star.eval.vq_metrics import CodebookUsage, ExportedFeatures, frechet_distance
from lit_star.models.vq_losses import (
    LPIPS,
    PatchDiscriminator,
    adaptive_gan_weight,
    build_perceptual_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from lit_star.modules.schedules import lr_multiplier
from lit_star.modules.vq_module import VQModule, warmed_up_ema

REPO = Path(__file__).resolve().parents[2]
# A VQ small enough for a CPU step in ~0.1 s: 4x downsampling, 64 codes of 8 dims, 16 px images.
TINY_VQ = {
    "ch": 32, "z_channels": 32, "encoder_ch_mult": [1, 1, 2], "decoder_ch_mult": [1, 1, 2], "num_res_blocks": 1,
    "codebook_size": 64, "codebook_embed_dim": 8, "codebook_projector": True, "projector_patch_size": 4,
}
TINY_MODULE = dict(
    flavour="tiny", vq_overrides=TINY_VQ, lr=2e-3, discriminator_width=8, discriminator_layers=2,
    discriminator_norm="group", log_images=2,
)
SIZE = 16


def random_images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "data_health": {"seen": 1, "skipped": 0}}


def loader(n: int = 8, seed: int = 0, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ImageSet(random_images(n, seed)), batch_size=batch_size)


def trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


# ------------------------------------------------------------------ schedules


def test_cosine_schedule_warms_up_and_decays_to_floor():
    values = [lr_multiplier(s, 100, "cosine", warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[55] == pytest.approx(0.55)
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_fvq_annealing_schedule_shape():
    total = 1000
    f = lambda s: lr_multiplier(s, total, "annealing", warmup_steps=40)  # noqa: E731
    assert f(0) == pytest.approx(0.005)
    assert f(20) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(40) == f(299) == 1.0
    assert f(300 + 350) == pytest.approx(1.0 + (0.01 - 1.0) * 0.5)
    assert f(total) == pytest.approx(0.01)


# ------------------------------------------------------------------ losses


def test_gan_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    sp = torch.nn.functional.softplus
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(0.5 * (sp(-real).mean() + sp(fake).mean()).item())
    assert non_saturating_g_loss(fake).item() == pytest.approx(sp(-fake).mean().item())


def test_adaptive_weight_is_gradient_norm_ratio():
    layer = nn.Conv2d(3, 3, 3, padding=1)
    out = layer(torch.randn(2, 3, 8, 8))
    nll, g = out.pow(2).mean(), -out.mean() * 3
    grad_nll = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0].norm()
    grad_g = torch.autograd.grad(g, layer.weight, retain_graph=True)[0].norm()
    weight = adaptive_gan_weight(nll, g, layer.weight)
    assert weight.item() == pytest.approx((grad_nll / (grad_g + 1e-4)).item(), rel=1e-5)
    assert not weight.requires_grad
    assert adaptive_gan_weight(nll, g * 1e-9, layer.weight, max_weight=7.0).item() == 7.0


def test_patch_discriminator_gives_patch_logits():
    logits = PatchDiscriminator(width=8, num_layers=2, norm="group")(random_images(2, size=32))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[-1] > 1


def test_perceptual_loss_disabled_without_weights_logs_once(caplog):
    with caplog.at_level(logging.WARNING, logger="lit_star.models.vq_losses"):
        assert build_perceptual_loss(None, None) is None
    lines = [r for r in caplog.records if "Perceptual loss DISABLED" in r.getMessage()]
    assert len(lines) == 1
    with pytest.raises(ValueError, match="perceptual_heads"):
        build_perceptual_loss("vgg.pth", None)


def test_perceptual_loss_loads_torchvision_and_lpips_layouts(tmp_path):
    widths = (4, 4, 8, 8, 8)
    source = LPIPS(widths)
    for p in source.parameters():
        nn.init.uniform_(p, 0.0, 0.5)  # positive heads, as trained LPIPS heads are
    backbone = {f"features.{k}": v for k, v in source.net.features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    heads = {k: v for k, v in source.state_dict().items() if k.startswith("lin")}
    torch.save(backbone, tmp_path / "vgg.pth")
    torch.save(heads, tmp_path / "heads.pth")
    loaded = build_perceptual_loss(str(tmp_path / "vgg.pth"), str(tmp_path / "heads.pth"))
    assert loaded.net.widths == widths
    x, y = random_images(2, 0, 32), random_images(2, 1, 32)
    assert torch.allclose(loaded(x, y), source(x, y))
    assert loaded(x, x).abs().max() < 1e-6 and (loaded(x, y) > 0).all()
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="lin4"):
        LPIPS.from_files(tmp_path / "vgg.pth", tmp_path / "bad.pth")


# ------------------------------------------------------------------ metrics


def test_codebook_usage_and_perplexity():
    usage = CodebookUsage(codebook_size=8)
    usage.update(torch.tensor([[0, 1], [2, 3]]))
    result = usage.compute()
    assert result["utilisation"].item() == pytest.approx(0.5)
    assert result["perplexity"].item() == pytest.approx(4.0)
    windowed = CodebookUsage(codebook_size=8, window_tokens=3)
    windowed.update(torch.tensor([5, 5, 6, 7, 1]))
    assert windowed.compute()["utilisation"].item() == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="outside"):
        CodebookUsage(4).update(torch.tensor([4]))


def test_frechet_distance_with_local_exported_features(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "features.pt2"))
    features = ExportedFeatures(tmp_path / "features.pt2", input_size=16)
    images = (random_images(64, 0, 24) + 1) / 2
    same = frechet_distance(features, input_size=16)
    same.update(images, real=True)
    same.update(images, real=False)
    shifted = frechet_distance(ExportedFeatures(tmp_path / "features.pt2", input_size=16), input_size=16)
    shifted.update(images, real=True)
    shifted.update((images * 0.3).clamp(0, 1), real=False)
    assert abs(same.compute().item()) < 1e-3
    assert shifted.compute().item() > 1e-2
    with pytest.raises(FileNotFoundError):
        ExportedFeatures(tmp_path / "missing.pt2")


# ------------------------------------------------------------------ VQModule


def test_ema_decay_warms_up_then_holds():
    update = warmed_up_ema(0.999)
    average = [torch.zeros(3)]
    update(average, [torch.ones(3)], torch.tensor(1))  # decay min(0.999, 2/11)
    torch.testing.assert_close(average[0], torch.full((3,), 9 / 11))
    average = [torch.zeros(3)]
    update(average, [torch.ones(3)], torch.tensor(100_000))  # warmed up: the set decay
    torch.testing.assert_close(average[0], torch.full((3,), 0.001))


def test_training_steps_with_gan_adaptive_weight_and_ema(tmp_path):
    torch.manual_seed(0)
    module = VQModule(**TINY_MODULE, gan_start_step=2, adaptive_gan_weight=True, ema_decay=0.5, warmup_steps=2)
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    fixed = loader(n=4, batch_size=4)
    first = module.vq(next(iter(fixed))["image"]).reconstruction
    initial = torch.nn.functional.mse_loss(first, next(iter(fixed))["image"]).item()
    run = trainer(tmp_path, max_steps=12, val_check_interval=12, check_val_every_n_epoch=None)
    run.fit(module, fixed, loader(n=4, seed=1))
    assert run.global_step == 12  # the discriminator's steps do not count as global steps
    metrics = run.callback_metrics
    assert metrics["train/reconstruction_loss"].item() < initial
    assert metrics["train/adaptive_gan_weight"].item() > 0
    assert "train/discriminator_loss" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert module.ema_vq.n_averaged.item() == 12
    ema, live = module.exported_vq(), module.vq
    assert ema is not live
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), live.parameters()))
    for name in ("val/psnr", "val/ssim", "val/codebook_utilisation", "val/code_perplexity"):
        assert math.isfinite(metrics[name].item()), name


def test_resume_continues_same_step_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    first = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    module = VQModule(**TINY_MODULE, gan_start_step=1, ema_decay=0.9)
    first.fit(module, loader())
    ckpt = tmp_path / "interrupted.ckpt"
    first.save_checkpoint(ckpt)
    saved = [copy.deepcopy(opt.state_dict()) for opt in first.optimizers]
    assert len(saved) == 2

    captured = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            captured["step"] = trainer.global_step
            captured["optimizers"] = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
            captured["ema"] = pl_module.ema_vq.n_averaged.item()

    second = trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[Capture()])
    second.fit(VQModule(**TINY_MODULE, gan_start_step=1, ema_decay=0.9), loader(), ckpt_path=ckpt)
    assert captured["step"] == 3
    assert captured["ema"] == 3
    for before, after in zip(saved, captured["optimizers"]):
        assert before["param_groups"] == after["param_groups"]
        assert before["state"].keys() == after["state"].keys()
        for key, state in before["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name])), (key, name)
    assert second.global_step == 5


# ------------------------------------------------------------------ tokenize


def write_shard(path: Path, n: int, seed: int, corrupt: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as writer:
        for i in range(n):
            scene = Scene(
                list(BACKGROUNDS)[i % len(BACKGROUNDS)],
                (WorldObject(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))],
                             "large", (int(rng.integers(3)), int(rng.integers(3)))),),
            )
            buffer = io.BytesIO()
            render_scene(scene, resolution=SIZE).save(buffer, format="PNG")
            png = buffer.getvalue() if i != corrupt else b"not a png"
            writer.write({"__key__": f"{seed:02d}{i:04d}", "png": png, "txt": "a shape", "json": scene.to_meta(SIZE)})


def test_tokenize_decodes_back_and_resumes(tmp_path, capsys):
    torch.manual_seed(0)
    module = VQModule(**TINY_MODULE, ema_decay=0.9)
    run = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    run.fit(module, loader())
    ckpt = tmp_path / "vq.ckpt"
    run.save_checkpoint(ckpt)

    shards, out = tmp_path / "shards", tmp_path / "codes"
    shards.mkdir()
    write_shard(shards / "train-000000.tar", 5, seed=0)
    write_shard(shards / "train-000001.tar", 4, seed=1, corrupt=2)
    argv = ["tokenize", "--vq", str(ckpt), "--shards", str(shards / "train-*.tar"), "--out", str(out),
            "--batch_size", "3", "--max_skip_fraction", "0.5"]
    assert cli(argv) == 0

    samples = list(wds.WebDataset(str(out / "train-*.tar").replace("*", "{000000..000001}"), shardshuffle=False))
    assert len(samples) == 8  # the corrupt sample was skipped (and counted)
    assert "skipped 1" in capsys.readouterr().out
    sample = samples[0]
    assert {"png", "txt", "json", "codes.npy", "codes_shape.json"} <= set(sample)
    codes = np.stack([np.load(io.BytesIO(s["codes.npy"])) for s in samples])
    assert codes.dtype == np.int16 and codes.shape[1:] == (SIZE // 4, SIZE // 4)
    assert json.loads(sample["codes_shape.json"]) == {"codes.npy": [SIZE // 4, SIZE // 4]}

    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        for s in samples
    ])
    model = module.exported_vq().eval()
    with torch.no_grad():
        direct = model(images)
    assert np.array_equal(direct.codes.numpy(), codes)
    decoded = load_vq(ckpt).decode_codes(torch.from_numpy(codes).long())
    assert torch.allclose(decoded, direct.reconstruction, atol=1e-5)

    # Resume: finished shards are skipped, a missing one is redone.
    done_mtime = (out / "train-000000.tar").stat().st_mtime_ns
    first_bytes = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").unlink()
    assert cli(argv) == 0
    assert "1 already done, 1 to encode" in capsys.readouterr().out
    assert (out / "train-000000.tar").stat().st_mtime_ns == done_mtime
    # Redone, the shard is the same bytes: members carry no time stamp.
    assert (out / "train-000001.tar").read_bytes() == first_bytes
    with tarfile.open(out / "train-000001.tar") as tar:
        assert sum(name.endswith(".codes.npy") for name in tar.getnames()) == 3
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------ recipes

STAGE1_RECIPES = {
    "shapes": ["recipes/shapes/stage1_vq.yaml"],
    "star_vq": ["recipes/stage1_vq/star_vq.yaml"],
    "vqgan_16384x8": ["recipes/stage1_vq/star_vq.yaml", "recipes/stage1_vq/vqgan_16384x8.yaml"],
    "no_projector": ["recipes/stage1_vq/star_vq.yaml", "recipes/stage1_vq/no_projector.yaml"],
}
RECIPE_FLAVOURS = {"shapes": "tiny", "star_vq": "star-vq", "vqgan_16384x8": "vqgan-16384x8", "no_projector": "star-vq"}


@pytest.mark.parametrize("name", sorted(STAGE1_RECIPES))
def test_stage1_recipe_parses_and_smoke_runs(name, tmp_path, capsys):
    from lit_star.training import StarCLI

    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "train-000000.tar", 4, seed=0)
    configs = [arg for path in STAGE1_RECIPES[name] for arg in ("--config", str(REPO / path))]
    data = [
        f"--data.init_args.train_shards={shards}/train-000000.tar", f"--data.init_args.val_shards={shards}/train-000000.tar",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.batches_per_epoch=null",
        f"--data.init_args.resolution={SIZE}",
    ]
    run = [
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
    ]
    # The recipe as written parses (nothing is built: print_config exits after parsing).
    with pytest.raises(SystemExit) as parsed:
        StarCLI(args=[*configs, "--print_config"], run=False)
    assert parsed.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lit_star.modules.vq_module.VQModule"
    assert printed["model"]["init_args"]["flavour"] == RECIPE_FLAVOURS[name]
    assert printed["trainer"]["max_steps"] > 0
    # Smoke run: a few steps of the same recipe with the tiny flavour on a tiny shard.
    tiny = [
        "--model.init_args.flavour=tiny", f"--model.init_args.vq_overrides={json.dumps(TINY_VQ)}",
        "--model.init_args.perceptual_backbone=null", "--model.init_args.perceptual_heads=null",
        "--model.init_args.gan_start_step=1", "--model.init_args.discriminator_width=8",
        "--model.init_args.discriminator_layers=2",
    ]
    cli = StarCLI(args=[*configs, *data, *run, *tiny], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    assert "val/psnr" in cli.trainer.callback_metrics
