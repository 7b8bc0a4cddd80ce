"""Stage 1: train the STAR-VQ tokenizer (``VQModule``).

    python -m lit_star fit --config recipes/shapes/stage1_vq.yaml                  # Shapes world, CPU
    python -m lit_star fit --config recipes/stage1_vq/star_vq.yaml                 # paper stage 1
    python -m lit_star fit --config recipes/shapes/stage1_vq.yaml --ckpt_path last # resume

Manual optimisation with two AdamW optimizers: the generator (encoder, quantizer incl. codebook
projector, decoder) and, once ``gan_start_step`` is reached, a PatchGAN discriminator. Generator loss:

    reconstruction_weight * L1|L2 + perceptual_weight * LPIPS
    + codebook_weight * (codebook + beta * commitment + entropy)        # beta, entropy ratio: VQConfig
    + gan_weight * adaptive_weight * generator GAN loss                 # adaptive_weight = 1 unless enabled

``trainer.global_step`` counts generator steps (one per batch): the discriminator's optimizer steps
through the strategy directly, so ``max_steps`` and both LR schedules mean training steps even
after the GAN starts. Validation (and :meth:`VQModule.exported_vq`) use the EMA weights when
``ema_decay`` is set.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel

from lit_star.data.health import strip_data_health
from lit_star.eval.vq_metrics import (
    CodebookUsage,
    ExportedFeatures,
    frechet_distance,
    reconstruction_metrics,
    to_unit_range,
)
from lit_star.models.vq import VQModel, vq_config
from lit_star.modules.schedules import Schedule, lr_multiplier
from lit_star.models.vq_losses import (
    PatchDiscriminator,
    adaptive_gan_weight,
    build_perceptual_loss,
    gan_losses,
    reconstruction_loss,
)


def warmed_up_ema(decay: float):
    """An ``AveragedModel`` ``multi_avg_fn``: EMA whose decay is ``min(decay, (1 + n) / (10 + n))``.

    Without the warm-up a 0.999 average over a 1000-step run still holds a third of its first weights:
    on the Shapes VQ it validated at 11 dB while the live weights were past 22 dB.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for average, value in zip(averaged, current):
            average.lerp_(value, weight)

    return update


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack equally shaped N x 3 x H x W batches ([-1, 1]) into one 3 x (R*H) x (N*W) image in [0, 1]."""
    return torch.cat([torch.cat(list(to_unit_range(row)), dim=2) for row in rows], dim=1)


def build_vq(flavour: str, vq_overrides: dict[str, Any] | None) -> VQModel:
    """The VQ model a :class:`VQModule` with these hyper-parameters trains (also used to reload one)."""
    return VQModel(vq_config(flavour, **(vq_overrides or {})))


class VQModule(L.LightningModule):
    """Trains :class:`~lit_star.models.vq.VQModel` with reconstruction, perceptual, VQ and GAN losses.

    Args:
        flavour: name in ``lit_star.models.vq.VQ_FLAVOURS`` (``tiny``, ``star-vq``, ``vqgan-16384x8``).
        vq_overrides: ``VQConfig`` fields replacing the flavour's (e.g. ``codebook_projector: false``,
            ``commit_loss_beta``, ``entropy_loss_ratio``, ``codebook_l2_norm``).
        reconstruction_loss: ``l1`` or ``l2``.
        perceptual_backbone / perceptual_heads: local torchvision-VGG16 and LPIPS-head weights; both
            ``None`` disables the perceptual loss (logged once).
        gan_start_step: generator step at which the discriminator starts; ``None`` builds no discriminator.
        adaptive_gan_weight: scale the GAN loss by the gradient-norm ratio at the decoder's last layer.
        schedule: ``cosine``, ``annealing`` (FVQ) or ``constant``; see :func:`lit_star.modules.schedules.lr_multiplier`.
        ema_decay: keep an EMA of the generator, used for validation and export (``None``: off). The
            decay warms up as ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (see
            :func:`warmed_up_ema`).
        usage_window_tokens: codebook utilisation / perplexity over at most this many validation tokens
            per process (``None``: the whole validation epoch).
        frechet_features: local ``torch.export`` feature network (.pt2) ([0,1] images -> B x F) for a Fréchet
            distance logged as ``val/frechet_<frechet_name>``; ``None`` skips it.
        log_images: originals + reconstructions shown in TensorBoard per validation epoch.
    """

    def __init__(
        self,
        flavour: str = "tiny",
        vq_overrides: dict[str, Any] | None = None,
        reconstruction_loss: Literal["l1", "l2"] = "l2",
        reconstruction_weight: float = 1.0,
        perceptual_backbone: str | None = None,
        perceptual_heads: str | None = None,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        gan_start_step: int | None = None,
        gan_weight: float = 0.5,
        gan_loss: Literal["hinge", "non_saturating"] = "hinge",
        adaptive_gan_weight: bool = False,
        adaptive_gan_weight_max: float = 1e4,
        discriminator_width: int = 64,
        discriminator_layers: int = 3,
        discriminator_norm: Literal["batch", "group"] = "batch",
        lr: float = 1e-4,
        discriminator_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        schedule: Schedule = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        annealing_start_ratio: float = 0.005,
        annealing_hold_fraction: float = 0.3,
        annealing_end_ratio: float = 0.01,
        ema_decay: float | None = None,
        usage_window_tokens: int | None = None,
        frechet_features: str | None = None,
        frechet_name: str = "features",
        frechet_input_size: int | None = None,
        log_images: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.vq = build_vq(flavour, vq_overrides)
        self.perceptual = build_perceptual_loss(perceptual_backbone, perceptual_heads)
        self.discriminator = (
            PatchDiscriminator(width=discriminator_width, num_layers=discriminator_layers, norm=discriminator_norm)
            if gan_start_step is not None
            else None
        )
        self.discriminator_loss, self.generator_loss = gan_losses(gan_loss)
        self.ema_vq = None
        if ema_decay is not None:
            # Buffers (the codebook-usage window) are copied, not averaged.
            self.ema_vq = AveragedModel(self.vq, multi_avg_fn=warmed_up_ema(ema_decay), use_buffers=False)
            self.ema_vq.requires_grad_(False)
        self.val_reconstruction = reconstruction_metrics()
        self.val_usage = CodebookUsage(self.vq.config.codebook_size, window_tokens=usage_window_tokens)
        self.val_frechet = None
        if frechet_features is not None:
            features = ExportedFeatures(frechet_features, input_size=frechet_input_size)
            self.val_frechet = frechet_distance(features, input_size=frechet_input_size or 64)

    # ------------------------------------------------------------------ helpers

    def exported_vq(self) -> VQModel:
        """The generator to validate and export: the EMA copy when enabled, else the trained one."""
        return self.ema_vq.module if self.ema_vq is not None else self.vq

    def gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.gan_start_step

    def _optimizers(self):
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers()
        if not isinstance(optimizers, list):
            optimizers, schedulers = [optimizers], [schedulers]
        return optimizers, schedulers

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = strip_data_health(batch)["image"]
        hp = self.hparams
        (opt_g, *opt_d), (sched_g, *sched_d) = self._optimizers()
        gan_on = self.gan_active()

        out = self.vq(images)
        reconstruction = out.reconstruction
        logs: dict[str, torch.Tensor | float] = {}
        rec = reconstruction_loss(reconstruction.float(), images.float(), hp.reconstruction_loss)
        nll = hp.reconstruction_weight * rec
        logs["train/reconstruction_loss"] = rec.detach()
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction, images).mean()
            nll = nll + hp.perceptual_weight * perceptual
            logs["train/perceptual_loss"] = perceptual.detach()
        q = out.quantizer
        vq_loss = q.codebook_loss + q.commitment_loss + q.entropy_loss
        loss = nll + hp.codebook_weight * vq_loss
        logs.update(
            {
                "train/codebook_loss": q.codebook_loss.detach(),
                "train/commitment_loss": q.commitment_loss.detach(),
                "train/entropy_loss": q.entropy_loss.detach(),
                "train/codebook_usage": float(q.codebook_usage),
                "train/perplexity": q.perplexity.detach(),
            }
        )

        if gan_on:
            # The generator step must not leave gradients on the discriminator.
            self.discriminator.requires_grad_(False)
            g_loss = self.generator_loss(self.discriminator(reconstruction))
            self.discriminator.requires_grad_(True)
            weight = (
                adaptive_gan_weight(nll, g_loss, self.vq.decoder.last_layer, hp.adaptive_gan_weight_max)
                if hp.adaptive_gan_weight
                else torch.ones((), device=self.device)
            )
            loss = loss + hp.gan_weight * weight * g_loss
            logs["train/generator_gan_loss"] = g_loss.detach()
            logs["train/adaptive_gan_weight"] = weight

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.grad_clip is not None:
            self.clip_gradients(opt_g, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched_g.step()
        if self.ema_vq is not None:
            self.ema_vq.update_parameters(self.vq)
        logs["train/loss"] = loss.detach()
        logs["train/lr"] = float(opt_g.optimizer.param_groups[0]["lr"])

        if gan_on:
            (opt_d,), (sched_d,) = opt_d, sched_d
            logits_real = self.discriminator(images.detach())
            logits_fake = self.discriminator(reconstruction.detach())
            d_loss = self.discriminator_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if hp.grad_clip is not None:
                self.clip_gradients(opt_d, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            # Through the strategy (precision plugin included) but not LightningOptimizer.step, which
            # would count a second global step per batch.
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
            sched_d.step()
            logs.update(
                {
                    "train/discriminator_loss": d_loss.detach(),
                    "train/logits_real": logits_real.detach().mean(),
                    "train/logits_fake": logits_fake.detach().mean(),
                }
            )
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss.detach()

    def configure_optimizers(self):
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("VQModule needs a finite number of steps for its LR schedule: set trainer.max_steps")
        multiplier = partial(
            lr_multiplier,
            total_steps=int(total),
            schedule=hp.schedule,
            warmup_steps=hp.warmup_steps,
            min_lr_ratio=hp.min_lr_ratio,
            annealing_start_ratio=hp.annealing_start_ratio,
            annealing_hold_fraction=hp.annealing_hold_fraction,
            annealing_end_ratio=hp.annealing_end_ratio,
        )
        opt_g = torch.optim.AdamW(self.vq.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        optimizers = [opt_g]
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt_g, multiplier)]
        if self.discriminator is not None:
            opt_d = torch.optim.AdamW(
                self.discriminator.parameters(),
                lr=hp.discriminator_lr or hp.lr,
                betas=tuple(hp.betas),
                weight_decay=hp.weight_decay,
            )
            optimizers.append(opt_d)
            # The discriminator's schedule counts from the start of training too (its steps begin later).
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt_d, multiplier))
        return optimizers, schedulers

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = strip_data_health(batch)["image"]
        out = self.exported_vq()(images)
        reconstruction = out.reconstruction.float()
        self.log(
            "val/reconstruction_loss",
            reconstruction_loss(reconstruction, images.float(), self.hparams.reconstruction_loss),
            on_epoch=True,
            batch_size=images.shape[0],
            sync_dist=True,
        )
        real, fake = to_unit_range(images), to_unit_range(reconstruction)
        self.val_reconstruction.update(fake, real)
        self.val_usage.update(out.codes)
        if self.val_frechet is not None:
            self.val_frechet.update(real, real=True)
            self.val_frechet.update(fake, real=False)
        if batch_idx == 0 and self.hparams.log_images > 0:
            self._log_grid(images[: self.hparams.log_images], reconstruction[: self.hparams.log_images])

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{name}": value for name, value in self.val_reconstruction.compute().items()}
        usage = self.val_usage.compute()
        values["val/codebook_utilisation"] = usage["utilisation"]
        values["val/code_perplexity"] = usage["perplexity"]
        if self.val_frechet is not None:
            values[f"val/frechet_{self.hparams.frechet_name}"] = self.val_frechet.compute()
            self.val_frechet.reset()
        self.val_reconstruction.reset()
        self.val_usage.reset()
        # Already reduced across processes by torchmetrics.
        self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=False)
        self.log("val_psnr", values["val/psnr"].float(), prog_bar=True, logger=False)

    def _log_grid(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_image"):
            grid = image_grid([originals.float(), reconstructions.clamp(-1, 1)])
            experiment.add_image("val/originals_vs_reconstructions", grid, self.global_step)
