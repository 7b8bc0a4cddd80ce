"""Stage 4: tune the stacked AR and the diffusion decoder together on text-to-image and editing (paper Table 9).

    python -m lit_star fit --config recipes/shapes/stage4_unified.yaml
    python -m lit_star fit --config recipes/stage4_unified/star_3b.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/stage4_unified/joint_from_scratch.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/shapes/stage4_unified.yaml --ckpt_path last      # resume

The module is thin: it holds a stage 2 :class:`~lit_star.modules.stacked_ar_module.StackedARModule` and a stage 3
:class:`~lit_star.modules.diffusion_decoder_module.DiffusionDecoderModule` (both configured in the recipe as
``stacked_ar`` and ``diffusion_decoder``) and reuses their sequence layout, cross-entropy, flow-matching loss,
conditioning dropout, per-sample seeding and frozen-weight checksums. Only the optimisation (one AdamW with a
parameter group per model) and the joint loss are its own:

    loss = CE(next image code) + flow_loss_weight * flow-matching loss

* Text-to-image batches (``caption`` + ``image`` or ``codes``): the stack learns the codes given the caption; the
  decoder learns the image given the caption and a VQ map of codes (``decoder_codes``: the ground truth, or the
  stack's teacher-forced argmax).
* Edit batches (``instruction`` + ``source_image`` + ``target_image``): the stack reads the source as VQ codes
  and ViT features (the reference's edit layout, prepared by the sampler's own function) and learns the target
  codes only; the decoder learns the target from the instruction and the source latent (its VQ map is zero for
  edits, as the reference trains it).
* A ``MixtureDataModule`` sets the text-to-image : edit ratio (``weights``); each batch is of one kind.

The VQ condition of the decoder is stop-gradient: it is the frozen codebook's vectors of integer codes, looked
up without autograd inside stage 3's loss, so the flow loss sends no gradient into the stack, the adapter or the
head (tested end to end). Frozen and checksummed at every save, and kept out of checkpoints: the base VLM, the VQ
(one instance shared by both models), the VAE and the text encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from lit_star.checkpoints import (
    FROZEN_CHECKSUMS_KEY,
    STAGE4_CONFIG_KEY,
    FrozenWeightsChangedError,
    load_stage2,
    load_stage3,
)
from lit_star.distributed.unified import parallelize_unified
from lit_star.models.diffusion_decoder import ConfigError
from lit_star.models.stacked_ar import base_state_checksum
from lit_star.modules.diffusion_decoder_module import FROZEN_STATE_PREFIXES as DECODER_FROZEN_PREFIXES
from lit_star.modules.diffusion_decoder_module import DiffusionDecoderModule
from lit_star.modules.schedules import check_global_batch_size, lr_multiplier
from lit_star.modules.stacked_ar_module import FROZEN_STATE_PREFIXES as STACK_FROZEN_PREFIXES
from lit_star.modules.stacked_ar_module import StackedARModule

DecoderCodes = Literal["ground_truth", "predicted"]
DECODER_CODES = ("ground_truth", "predicted")
# The state-dict prefixes of the two models inside this module (checkpoints: lit_star.checkpoints.load_stage4).
STACK_PREFIX, DECODER_PREFIX = "autoregressive.", "diffusion."
FROZEN_STATE_PREFIXES = (*(STACK_PREFIX + p for p in STACK_FROZEN_PREFIXES),
                         *(DECODER_PREFIX + p for p in DECODER_FROZEN_PREFIXES))


class UnifiedTuneModule(LightningModule):
    """Stage 4 LightningModule: the stacked AR and the diffusion decoder trained jointly.

    Args:
        stacked_ar: the stage 2 module (its model, layout, CFG dropout and frozen base/VQ); its own optimisation
            fields (learning_rate, betas, ...) are not used here.
        diffusion_decoder: the stage 3 module (its decoder, flow loss and dropout); its ``vq_path`` must be the
            stack's; its optimisation fields are not used here either.
        init_stack_from: a stage 2 checkpoint (``StackedARModule`` ``.ckpt``) or a ``save_stacked_ar`` /
            ``import-reference`` directory whose trainable weights (stack, adapter, head) replace the stack's
            initialisation; its recorded frozen checksums must match ours. ``None``: the stack's own init
            (``stacked_ar.init_args.stack_init``), e.g. joint training from scratch.
        init_decoder_from: a stage 3 checkpoint (``DiffusionDecoderModule`` ``.ckpt``) or a ``save_decoder``
            directory (``import-reference`` writes ``OUT/diffusion_decoder``) whose DiT replaces the decoder's.
        flow_loss_weight: λ in ``CE + λ · flow``.
        decoder_codes: which codes feed the decoder's VQ map on text-to-image batches (the paper does not say):
            ``ground_truth`` (the image's codes) or ``predicted`` (the stack's teacher-forced argmax, no gradient).
        stack_learning_rate / decoder_learning_rate: the two parameter groups' AdamW learning rates (stack,
            adapter and head / the DiT). Table 9 stage 4: 1e-3 for all.
        betas / weight_decay / warmup_steps / lr_schedule / min_lr_ratio: AdamW and the schedule, both groups.
        global_batch_size: if set, fit refuses to start unless the global batch equals it (4608 in the paper).
    """

    def __init__(
        self,
        stacked_ar: StackedARModule,
        diffusion_decoder: DiffusionDecoderModule,
        init_stack_from: str | None = None,
        init_decoder_from: str | None = None,
        flow_loss_weight: float = 1.0,
        decoder_codes: DecoderCodes = "ground_truth",
        stack_learning_rate: float = 1e-3,
        decoder_learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.0,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        # Every config error here, before configure_model reads a single weight.
        if decoder_codes not in DECODER_CODES:
            raise ConfigError(f"decoder_codes must be one of {list(DECODER_CODES)}, got {decoder_codes!r}")
        if flow_loss_weight < 0:
            raise ConfigError(f"flow_loss_weight must be >= 0, got {flow_loss_weight}")
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
        ar_vq = (stacked_ar.hparams.vq_path, stacked_ar.hparams.vq_flavour)
        decoder_vq = (diffusion_decoder.hparams.vq_path, diffusion_decoder.hparams.vq_flavour)
        if ar_vq != decoder_vq:
            raise ConfigError(
                f"stacked_ar.init_args.vq_path/vq_flavour {ar_vq} and diffusion_decoder.init_args.vq_path/vq_flavour "
                f"{decoder_vq} differ; both models read one VQ"
            )
        for name, path in (("init_stack_from", init_stack_from), ("init_decoder_from", init_decoder_from)):
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{name}: {path} does not exist")
        # The two models are recorded by the CLI's config (and in the checkpoint by on_save_checkpoint).
        self.save_hyperparameters(ignore=["stacked_ar", "diffusion_decoder"])
        self.autoregressive = stacked_ar
        self.diffusion = diffusion_decoder
        self.frozen_checksums: dict[str, str] = {}
        # The children's hooks drop their frozen weights from state_dict(); loading the whole module needs its own
        # hook to not miss them (the children's see the keys with this module's prefixes).
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_state)

    # ---- model construction -------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build both models around one VQ, load the stage 2 / stage 3 weights, then apply the joint plan."""
        if self.autoregressive.model is not None:
            return
        ar, diffusion = self.autoregressive, self.diffusion
        ar.build_model()
        diffusion.vq = ar.vq  # one frozen VQ (same path, checked in __init__)
        diffusion.build_model()
        empty = torch.get_default_device().type == "meta"
        if not empty:
            self.frozen_checksums = self._merged_checksums(ar.frozen_checksums, diffusion.frozen_checksums)
            if self.hparams.init_stack_from is not None:
                self._init_stack(Path(self.hparams.init_stack_from))
            if self.hparams.init_decoder_from is not None:
                self._init_decoder(Path(self.hparams.init_decoder_from))
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        mesh = self.device_mesh["data_parallel"] if sharded else None
        counts = parallelize_unified(
            ar.model, ar.stacked_ar, diffusion.decoder,
            stack_activation_checkpointing=ar.hparams.activation_checkpointing,
            compile_layers=ar.hparams.compile_layers and not empty,
            decoder_activation_checkpointing=diffusion.hparams.activation_checkpointing,
            mesh=mesh,
        )
        if mesh is not None:
            rank_zero_info(f"stage 4: FSDP2 over {mesh.size()} ranks, {counts['stacked_ar']} stack units + root, "
                           f"{counts['diffusion_decoder']} DiT blocks + root")

    @staticmethod
    def _merged_checksums(*parts: Mapping[str, str]) -> dict[str, str]:
        merged: dict[str, str] = {}
        for part in parts:
            for name, value in part.items():
                if merged.setdefault(name, value) != value:
                    raise FrozenWeightsChangedError(f"the two models loaded different frozen {name} weights")
        return merged

    def _init_stack(self, source: Path) -> None:
        hp = self.autoregressive.hparams
        # load_stage2 verifies its recorded checksums against the frozen weights at our paths.
        loaded = load_stage2(source, base=hp.base_path, vq=hp.vq_path, vq_flavour=hp.vq_flavour)
        self.autoregressive.stacked_ar.load_trainable_state_dict(loaded.stacked_ar.trainable_state_dict())
        rank_zero_info(f"stage 4: stack, adapter and head initialised from {source}")

    def _init_decoder(self, source: Path) -> None:
        hp = self.diffusion.hparams
        loaded = load_stage3(source, vq=hp.vq_path, vq_flavour=hp.vq_flavour)
        ours = self.diffusion.decoder.frozen_modules()
        theirs = loaded.decoder.frozen_modules()
        if set(ours) != set(theirs):
            raise FrozenWeightsChangedError(f"{source} has frozen parts {sorted(theirs)}, this decoder {sorted(ours)}")
        changed = sorted(n for n in ours if base_state_checksum(theirs[n]) != self.frozen_checksums[n])
        if changed:
            raise FrozenWeightsChangedError(
                f"{source} was trained with different frozen {', '.join(changed)} weights than "
                "diffusion_decoder.init_args configures")
        self.diffusion.decoder.denoiser.load_state_dict(loaded.decoder.denoiser.state_dict(), strict=True)
        rank_zero_info(f"stage 4: DiT initialised from {source}")

    # ---- steps --------------------------------------------------------------------------------

    def losses(self, batch: Mapping[str, Any], batch_idx: int, dropout: bool) -> dict[str, torch.Tensor]:
        """``{"loss", "ce", "flow"}`` of one batch (text-to-image or edit); ``dropout``: the CFG / conditioning
        dropout of training."""
        ar, diffusion = self.autoregressive, self.diffusion
        edit = "target_image" in batch or "target_codes" in batch
        if edit:
            target_codes = diffusion._codes(batch.get("target_image"), batch.get("target_codes"))
            sources = ar.edit_sources(batch["source_image"], vq_size=self._vq_size(target_codes))
            sequences = ar.layout_edit_batch(batch, target_codes, sources, cfg_dropout=dropout)
            codes = target_codes
        else:
            codes = diffusion._codes(batch.get("image"), batch.get("codes"))
            sequences = ar.layout_batch(batch, codes, cfg_dropout=dropout)
        ar.trained_image_size = self._vq_size(codes)
        predicted = self.hparams.decoder_codes == "predicted" and not edit
        ce, predictions = ar.model(sequences, ar._code_vectors(sequences.code_ids),
                                   predict_rows=sequences.input_ids.shape[0] if predicted else 0)
        decoder_batch = dict(batch)
        if not edit:
            # Stage 3's loss reads these integer codes and looks their vectors up without autograd: the stop-gradient.
            decoder_batch["codes"] = torch.cat(predictions).view_as(codes) if predicted else codes
        flow = diffusion.flow_loss(diffusion.unpack(decoder_batch, batch_idx), dropout=dropout)
        return {"loss": ce + self.hparams.flow_loss_weight * flow, "ce": ce, "flow": flow}

    def _vq_size(self, codes: torch.Tensor) -> int:
        return int(codes.shape[-1]) * self.autoregressive.vq.config.downsample_factor

    @staticmethod
    def _kind(batch: Mapping[str, Any]) -> str:
        return "edit" if "target_image" in batch or "target_codes" in batch else "t2i"

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, batch_idx, dropout=True)
        size = len(batch["__key__"]) if "__key__" in batch else None
        kind = self._kind(batch)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log(f"train/ce_{kind}", losses["ce"], batch_size=size)
        self.log(f"train/flow_{kind}", losses["flow"], batch_size=size)
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        losses = self.losses(batch, batch_idx, dropout=False)
        size = len(batch["__key__"]) if "__key__" in batch else None
        kind = self._kind(batch)
        for name in ("loss", "ce", "flow"):
            self.log(f"val/{name}_{kind}", losses[name], batch_size=size, add_dataloader_idx=False, sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        check_global_batch_size(self.trainer, self.hparams.global_batch_size)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two AdamW groups: the stack (+ adapter + head) and the DiT, each with its own learning rate."""
        hp = self.hparams
        stack = [p for p in self.autoregressive.parameters() if p.requires_grad]
        dit = [p for p in self.diffusion.parameters() if p.requires_grad]
        if not stack or not dit:
            raise RuntimeError(f"stage 4 found {len(stack)} trainable stack and {len(dit)} DiT tensors")
        return [{"name": "stack", "params": stack, "lr": hp.stack_learning_rate},
                {"name": "dit", "params": dit, "lr": hp.decoder_learning_rate}]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameter_groups(), betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = self.trainer.max_steps
        if hp.lr_schedule != "constant" and (total is None or total <= 0):
            raise ValueError(f"lr_schedule {hp.lr_schedule!r} needs trainer.max_steps > 0")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_multiplier, total_steps=total, schedule=hp.lr_schedule,
                               warmup_steps=hp.warmup_steps, min_lr_ratio=hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------

    def verify_frozen_weights(self) -> None:
        """Both models' checks (base, VQ, VAE, text encoder); raises ``FrozenWeightsChangedError``."""
        self.autoregressive.verify_frozen_weights()
        self.diffusion.verify_frozen_weights()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Each model's own hook verifies its frozen weights and records what its loader needs.
        records: dict[str, Any] = {}
        checksums = []
        for module in (self.autoregressive, self.diffusion):
            part: dict[str, Any] = {}
            module.on_save_checkpoint(part)
            checksums.append(part.pop(FROZEN_CHECKSUMS_KEY))
            records.update(part)
        checkpoint.update(records)
        checkpoint[FROZEN_CHECKSUMS_KEY] = self._merged_checksums(*checksums)
        checkpoint[STAGE4_CONFIG_KEY] = {"decoder_codes": self.hparams.decoder_codes,
                                         "flow_loss_weight": self.hparams.flow_loss_weight,
                                         "edit_vit_limits": vars(self.autoregressive.edit_vit_limits)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if STAGE4_CONFIG_KEY not in checkpoint:
            raise KeyError(f"checkpoint has no {STAGE4_CONFIG_KEY!r}: not a UnifiedTuneModule checkpoint")
        self.autoregressive.on_load_checkpoint(checkpoint)
        self.diffusion.on_load_checkpoint(checkpoint)


def _ignore_missing_frozen_state(module, incompatible_keys) -> None:
    for key in [k for k in incompatible_keys.missing_keys if k.startswith(FROZEN_STATE_PREFIXES)]:
        incompatible_keys.missing_keys.remove(key)
