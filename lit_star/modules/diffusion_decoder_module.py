"""Stage 3: train the Lumina2 diffusion decoder that turns STAR's VQ embeddings into pixels.

    python -m lit_star fit --config recipes/shapes/stage3_diffusion_decoder.yaml
    python -m lit_star fit --config recipes/stage3_diffusion_decoder/lumina2.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/stage3_diffusion_decoder/lumina2.yaml \\
        --config recipes/stage3_diffusion_decoder/concat_sequence.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/shapes/stage3_diffusion_decoder.yaml --ckpt_path last      # resume

Objective (the reference's ``Lumina2Decoder.forward``): rectified flow. σ comes from the scheduler's table at
⌊u·1000⌋ with u from diffusers' ``compute_density_for_timestep_sampling``; x_σ = σ ε + (1 - σ) x0, target
x0 - ε, loss = mean(w(σ) (pred - target)²) with ``compute_loss_weighting_for_sd3``; the DiT gets timestep
1 - t/1000. InstructPix2Pix conditioning dropout with probability u (``uncondition_prob``): the prompt becomes
"" if p < 2u, the VQ map is zeroed if p <= ``vq_drop_prob`` (always for edit samples), the source latent is
zeroed if u <= p < 3u. Every draw (noise, u, p, the VAE's posterior sample) comes from a generator seeded by
``seed``, the epoch and the sample's key, so a sample gets the same draws on any number of devices and after a
resume.

Batches: ``ImageTextDataModule`` (image, caption, and optionally pre-tokenized ``codes`` and ``latents``)
for text-to-image, ``EditDataModule`` (source_image, target_image, instruction) for editing. Codes missing
from the batch are computed by the frozen VQ; latents missing are computed by the frozen VAE.

Frozen parts (the VQ, the VAE, the text encoder) are checksummed when loaded and at every save, and kept out
of checkpoints, exactly as stage 2 does for its base (see ``stacked_ar_module``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_star.checkpoints import (
    FROZEN_CHECKSUMS_KEY,
    STAGE3_CONFIG_KEY,
    DecoderSpec,
    FrozenWeightsChangedError,
    build_diffusion_decoder,
    load_vq,
)
from lit_star.distributed.diffusion_decoder import parallelize_diffusion_decoder
from lit_star.models.diffusion_decoder import (
    ConfigError,
    DiffusionDecoder,
    conditioning_dropout,
    flow_matching_loss,
    noisy_latents,
    vq_map,
)
from lit_star.models.edit_source import stretch_images
from lit_star.models.stacked_ar import base_state_checksum
from lit_star.models.vq import VQModel
from lit_star.modules.schedules import check_global_batch_size, lr_multiplier

FROZEN_STATE_PREFIXES = ("decoder.vae.", "decoder.text_encoder.", "vq.")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")


class DiffusionDecoderModule(LightningModule):
    """Stage 3 LightningModule: the Lumina2 decoder conditioned on a frozen VQ's codebook vectors.

    Args:
        vq_path / vq_flavour: the frozen VQ (as in stage 2): a ``VQModule`` checkpoint, a
            ``VQModel.save_pretrained`` directory or a reference ``VQ-Model.pt`` (then ``vq_flavour``).
        conditioning: ``channel`` (the reference), ``sequence`` or ``text`` (paper Table 7b).
        lumina_path, transformer, embedder_init, vae_path, pixel_space, text_encoder_path, tiny_text_encoder,
            max_caption_tokens, system_prompt, scheduler_shift: where the decoder's parts come from
            (:class:`lit_star.checkpoints.DecoderSpec`). ``system_prompt: default`` is the reference's text,
            ``null`` none.
        vq_resolution: images are resized to this side before the frozen VQ encodes them (the paper's VQ sees
            384 px while the decoder trains at 512); ``None``: the data resolution. Ignored with pre-tokenized
            codes.
        weighting_scheme / logit_mean / logit_std / mode_scale: diffusers' timestep density and loss weighting
            (the reference's flags; its values were not released: logit-normal (0, 1) is SD3's default).
        uncondition_prob / vq_drop_prob: the InstructPix2Pix dropout probabilities u and p_drop.
        learning_rate / betas / weight_decay / warmup_steps / lr_schedule / min_lr_ratio: AdamW (Table 9
            stage 3: 1e-4 constant).
        global_batch_size: if set, fit refuses to start unless the global batch equals it (2048 in the paper).
        activation_checkpointing: recompute every DiT block in backward.
        seed: seeds the per-sample draws (with the epoch and the sample key) and the fresh DiT's initialisation.
    """

    def __init__(
        self,
        vq_path: str,
        vq_flavour: str | None = None,
        conditioning: Literal["channel", "sequence", "text"] = "channel",
        lumina_path: str | None = None,
        transformer: str | dict | None = None,
        embedder_init: Literal["scatter", "reference"] = "scatter",
        vae_path: str | None = None,
        pixel_space: bool = False,
        text_encoder_path: str | None = None,
        tiny_text_encoder: dict | None = None,
        max_caption_tokens: int = 256,
        system_prompt: str | None = "default",
        scheduler_shift: float | None = None,
        vq_resolution: int | None = None,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        uncondition_prob: float = 0.05,
        vq_drop_prob: float = 0.05,
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.0,
        global_batch_size: int | None = None,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Every config error surfaces here, before configure_model reads a single weight.
        self.spec = DecoderSpec(
            conditioning=conditioning, lumina_path=lumina_path, transformer=transformer,
            embedder_init=embedder_init, vae_path=vae_path, pixel_space=pixel_space,
            text_encoder_path=text_encoder_path, tiny_text_encoder=tiny_text_encoder,
            max_caption_tokens=max_caption_tokens, system_prompt=system_prompt, scheduler_shift=scheduler_shift,
            seed=seed,
        )
        self.spec.validate()
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(f"weighting_scheme must be one of {list(WEIGHTING_SCHEMES)}, got {weighting_scheme!r}")
        for name, value in (("uncondition_prob", uncondition_prob), ("vq_drop_prob", vq_drop_prob)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.save_hyperparameters()
        self.decoder: DiffusionDecoder | None = None
        self.vq: VQModel | None = None
        self.frozen_checksums: dict[str, str] = {}
        self._val_sum: torch.Tensor | None = None
        self._val_count = 0
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_state)

    # ---- model construction -------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.decoder is not None:
            return
        self.build_model()
        self._apply_parallelism_plan()

    def build_model(self) -> None:
        """:meth:`configure_model` without the parallelism plan (stage 4 applies one plan over both models).

        A VQ already set on ``self.vq`` (stage 4 shares one between its models) is used instead of loading one.
        """
        if self.decoder is not None:
            return
        hp = self.hparams
        empty = torch.get_default_device().type == "meta"
        if self.vq is None:
            self.vq = load_vq(hp.vq_path, hp.vq_flavour)
        self.vq.requires_grad_(False).eval()
        decoder, scheduler = build_diffusion_decoder(self.spec, self.vq.config.codebook_embed_dim, empty=empty)
        for module in decoder.frozen_modules().values():
            module.requires_grad_(False).eval()
        self.decoder = decoder
        self.scheduler = scheduler
        self.register_buffer("train_sigmas", scheduler.sigmas[: len(scheduler.timesteps)].clone().float(), persistent=False)
        self.register_buffer("train_timesteps", scheduler.timesteps.clone().float(), persistent=False)
        if not empty:
            self.frozen_checksums = self._checksums()
        rank_zero_info(
            f"stage 3 ({hp.conditioning} conditioning): DiT {_count(decoder.denoiser):,} trainable parameters; "
            f"frozen text encoder {_count(decoder.text_encoder):,}, "
            f"VAE {_count(decoder.vae) if decoder.vae is not None else 0:,} (pixel space: {decoder.vae is None}), "
            f"VQ {_count(self.vq):,}"
        )

    def _checksums(self) -> dict[str, str]:
        sums = {"vq": base_state_checksum(self.vq)}
        for name, module in self.decoder.frozen_modules().items():
            sums[name] = base_state_checksum(module)
        return sums

    def _apply_parallelism_plan(self) -> None:
        """:func:`~lit_star.distributed.diffusion_decoder.parallelize_diffusion_decoder`, FSDP2 under
        ``ModelParallelStrategy``."""
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        mesh = self.device_mesh["data_parallel"] if sharded else None
        count = parallelize_diffusion_decoder(self.decoder, self.hparams.activation_checkpointing, mesh)
        if mesh is not None:
            rank_zero_info(f"stage 3: FSDP2 over {mesh.size()} ranks, {count} DiT blocks + root")

    def train(self, mode: bool = True) -> DiffusionDecoderModule:
        super().train(mode)
        if self.vq is not None:
            self.vq.eval()
        if self.decoder is not None:
            for module in self.decoder.frozen_modules().values():
                module.eval()
        return self

    # ---- batches ------------------------------------------------------------------------------

    def _generators(self, keys: list[str], salt: str) -> list[torch.Generator]:
        generators = []
        for key in keys:
            digest = hashlib.sha256(f"{self.hparams.seed}:{salt}:{key}".encode()).digest()
            generators.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)))
        return generators

    def _keys(self, batch: Mapping[str, Any], batch_idx: int, size: int) -> list[str]:
        if "__key__" in batch:
            return [str(k) for k in batch["__key__"]]
        return [f"{self.global_step}:{batch_idx}:{i}" for i in range(size)]

    def _codes(self, images: torch.Tensor | None, codes: torch.Tensor | None) -> torch.Tensor:
        if codes is not None:
            return codes.long().to(self.device)
        if images is None:
            raise KeyError("a stage 3 batch needs codes or images")
        if self.hparams.vq_resolution is not None and images.shape[-1] != self.hparams.vq_resolution:
            size = (self.hparams.vq_resolution, self.hparams.vq_resolution)
            images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return self.vq.encode_to_codes(images.float())

    def _latents(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        decoder = self.decoder
        if decoder.vae is None:
            return images.float()
        with torch.no_grad():
            posterior = decoder.vae.encode(images.to(decoder.vae.dtype)).latent_dist
            return self._sample_posterior(posterior.mean.float(), posterior.logvar.float(), generators)

    def _sample_posterior(self, mean: torch.Tensor, logvar: torch.Tensor, generators: list[torch.Generator]):
        """A latent sample (x - shift) * scale from the VAE posterior, with each sample's own generator."""
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(mean)
        config = self.decoder.config
        return (mean + std * eps - config.vae_shift) * config.vae_scale

    def _pre_extracted_latents(self, posterior: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``latents`` from ``tokenize --vae``: the posterior's mean and log-variance stacked along channels."""
        posterior = posterior.float().to(self.device)
        if self.decoder.vae is None:
            raise KeyError("pre-extracted 'latents' need the VAE they came from (vae_path or lumina_path)")
        mean, logvar = posterior.chunk(2, dim=1)
        return self._sample_posterior(mean, logvar, generators)

    def unpack(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Target latents, prompts, VQ codes, source latents and the edit flag of a batch."""
        edit = "target_image" in batch
        if edit:
            prompts = list(batch["instruction"])
            images = batch["target_image"].to(self.device)
        else:
            if "caption" not in batch:
                raise KeyError(f"a text-to-image batch needs 'caption'; got keys {sorted(batch)}")
            prompts = list(batch["caption"])
            images = batch["image"].to(self.device) if "image" in batch else None
        keys = self._keys(batch, batch_idx, len(prompts))
        epoch = self.current_epoch if self.training else "val"
        generators = self._generators(keys, f"{epoch}")
        if "latents" in batch:
            latents = self._pre_extracted_latents(batch["latents"], self._generators(keys, f"{epoch}:vae"))
        elif images is not None:
            latents = self._latents(images, self._generators(keys, f"{epoch}:vae"))
        else:
            raise KeyError(f"a stage 3 batch needs 'latents' or images; got keys {sorted(batch)}")
        if not edit and images is None and "codes" not in batch:
            raise KeyError(f"a text-to-image batch needs 'codes' or 'image' for the VQ; got keys {sorted(batch)}")
        codes = None if edit else self._codes(images, batch.get("codes"))
        source = None
        if edit:
            # The decoder's view of the source (stored size, or already square): stretched to the target's side as
            # the reference's get_full_transform and the sampler (generate's diffusion edit) do.
            side = images.shape[-1]
            sources = stretch_images(batch["source_image"], side).to(self.device)
            source = self._latents(sources, self._generators(keys, f"{epoch}:source"))
        return dict(latents=latents, prompts=prompts, codes=codes, source=source, edit=edit, generators=generators)

    def flow_loss(self, inputs: dict[str, Any], dropout: bool) -> torch.Tensor:
        hp = self.hparams
        latents, generators = inputs["latents"], inputs["generators"]
        b = latents.shape[0]
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = torch.cat([compute_density_for_timestep_sampling(hp.weighting_scheme, 1, hp.logit_mean, hp.logit_std,
                                                             hp.mode_scale, generator=g) for g in generators])
        indices = (u * len(self.train_timesteps)).long().clamp(max=len(self.train_timesteps) - 1).to(self.device)
        sigmas, timesteps = self.train_sigmas[indices], self.train_timesteps[indices]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
        p = torch.cat([torch.rand(1, generator=g) for g in generators]).to(self.device)
        decoder = self.decoder
        if inputs["codes"] is not None:
            with torch.no_grad():
                vq = vq_map(self.vq.codebook_vectors(inputs["codes"]), tuple(latents.shape[-2:])).float()
        else:
            vq = latents.new_zeros(b, decoder.config.codebook_dim, *latents.shape[-2:])
        prompt_embeds, prompt_mask = decoder.encode_prompts(inputs["prompts"])
        source = inputs["source"]
        if dropout:
            masks = conditioning_dropout(p, hp.uncondition_prob, hp.vq_drop_prob, is_edit=inputs["edit"])
            negative, negative_mask = decoder.negative_prompt(b)
            prompt_embeds = torch.where(masks.prompt[:, None, None], negative, prompt_embeds)
            prompt_mask = torch.where(masks.prompt[:, None], negative_mask, prompt_mask)
            vq = vq * (~masks.vq).to(vq.dtype)[:, None, None, None]
            if source is not None:
                source = source * (~masks.source).to(source.dtype)[:, None, None, None]
        elif inputs["edit"]:
            vq = torch.zeros_like(vq)
        noisy = noisy_latents(latents, noise, sigmas)
        prediction = decoder.denoiser(noisy, 1 - timesteps / 1000, prompt_embeds.float(), prompt_mask, vq, source)
        return flow_matching_loss(prediction, latents, noise, sigmas, hp.weighting_scheme)

    # ---- steps --------------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.unpack(batch, batch_idx)
        loss = self.flow_loss(inputs, dropout=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=inputs["latents"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = 0

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        inputs = self.unpack(batch, batch_idx)
        loss = self.flow_loss(inputs, dropout=False)
        b = inputs["latents"].shape[0]
        self._val_sum += loss.double() * b
        self._val_count += b

    def on_validation_epoch_end(self) -> None:
        if self._val_count == 0:
            return
        reduce = self.trainer.strategy.reduce
        total = reduce(self._val_sum, reduce_op="sum")
        count = reduce(torch.tensor(float(self._val_count), device=self.device), reduce_op="sum")
        self.log("val/loss", (total / count).float(), prog_bar=True, sync_dist=False)

    # ---- optimisation -------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        check_global_batch_size(self.trainer, self.hparams.global_batch_size)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas),
                                      weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps
        if self.hparams.lr_schedule != "constant" and (total is None or total <= 0):
            raise ValueError(f"lr_schedule {self.hparams.lr_schedule!r} needs trainer.max_steps > 0")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_multiplier, total_steps=total, schedule=self.hparams.lr_schedule,
                               warmup_steps=self.hparams.warmup_steps, min_lr_ratio=self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------

    def verify_frozen_weights(self) -> None:
        current = self._checksums()
        changed = [name for name in current if current[name] != self.frozen_checksums.get(name)]
        if changed:
            raise FrozenWeightsChangedError(
                f"frozen {', '.join(changed)} weights changed since they were loaded; refusing to save a "
                "checkpoint of a run whose frozen weights were modified"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.verify_frozen_weights()
        checkpoint[FROZEN_CHECKSUMS_KEY] = dict(self.frozen_checksums)
        checkpoint[STAGE3_CONFIG_KEY] = {
            "decoder": self.decoder.config.to_dict(),
            "spec": dict(vars(self.spec)),
            "vq_path": self.hparams.vq_path,
            "vq_flavour": self.hparams.vq_flavour,
            "scheduler": dict(self.scheduler.config),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(FROZEN_CHECKSUMS_KEY)
        if recorded is None:
            raise KeyError(f"checkpoint has no {FROZEN_CHECKSUMS_KEY!r}: not a DiffusionDecoderModule checkpoint")
        changed = sorted(name for name in self.frozen_checksums if recorded.get(name) != self.frozen_checksums[name])
        if changed:
            raise FrozenWeightsChangedError(
                f"the checkpoint was trained on different frozen weights ({', '.join(changed)}); point vq_path / "
                "vae_path / text_encoder_path at the ones it was trained with"
            )


def _drop_frozen_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.removeprefix(prefix).startswith(FROZEN_STATE_PREFIXES)]:
        del state_dict[key]


def _ignore_missing_frozen_state(module: nn.Module, incompatible_keys) -> None:
    for key in [k for k in incompatible_keys.missing_keys if k.startswith(FROZEN_STATE_PREFIXES)]:
        incompatible_keys.missing_keys.remove(key)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
