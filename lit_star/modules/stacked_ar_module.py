"""Stage 2: train the stacked AR layers on text-to-image next-token prediction over a frozen base.

    python -m lit_star fit --config recipes/shapes/stage2_stacked_ar.yaml --config recipes/trainer/cpu.yaml
    python -m lit_star fit --config recipes/stage2_stacked_ar/star_3b.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/stage2_stacked_ar/star_3b.yaml \\
        --config recipes/stage2_stacked_ar/ablations/layers_8.yaml --config recipes/trainer/fsdp.yaml
    python -m lit_star fit --config recipes/shapes/stage2_stacked_ar.yaml --ckpt_path last      # resume

Each training batch (image + caption, or pre-tokenized ``codes`` + caption; batch format in README.md) becomes the
reference's text-to-image sequences (:class:`~lit_star.models.sequence_layout.SequenceLayout`): chat
template, assistant header, ``<|vision_start|>``, image codes; with probability ``cfg_dropout`` a sample
becomes the reference's unconditional row. The loss is cross-entropy on image-token positions only,
computed in chunks (:func:`~lit_star.models.ar_loss.chunked_cross_entropy`).

What is frozen, and how that is kept honest:

* the base VLM (``model.stacked_ar.base``) and the VQ (``vq``) have ``requires_grad=False`` and stay in
  eval mode; gradients still flow *through* the base to the generation adapter;
* a SHA-256 checksum of each is recorded when it is loaded and recomputed at every checkpoint save; a
  mismatch raises :class:`FrozenWeightsChangedError` instead of writing the checkpoint;
* checkpoints hold only the trainable weights (stack, adapter, pixel head), the optimizer and both
  checksums. The frozen weights are re-read from ``base_path`` / ``vq_path`` on resume, and
  ``on_load_checkpoint`` refuses a checkpoint whose recorded checksums differ from what was loaded, so a
  resumed run computes exactly what the uninterrupted one would have (a 3B base is not copied into every
  checkpoint, and a DCP checkpoint under FSDP2 does not shard it either).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from lit_star.checkpoints import (
    FROZEN_CHECKSUMS_KEY,
    IMAGE_SIZE_KEY,
    REFERENCE_REASONING_SUFFIX,
    STACKED_AR_CONFIG_KEY,
    STACKED_AR_FIELDS,
    FrozenWeightsChangedError,
    load_vq,
)
from lit_star.distributed.plans import require_compile_toolchain
from lit_star.distributed.stacked_ar import parallelize_stacked_ar
from lit_star.models.ar_loss import DEFAULT_CHUNK_SIZE
from lit_star.models.flavours import stack_flavour
from lit_star.models.base_vlm import load_base_vlm, load_processor
from lit_star.models.edit_source import SourceImage, VitPixelLimits, encode_edit_source, tensor_to_image
from lit_star.models.sequence_layout import (
    IGNORE_INDEX,
    SequenceBatch,
    SequenceLayout,
    collate_packed,
    collate_padded,
)
from lit_star.models.stacked_ar import (
    STACKED_AR_CONFIG,
    STACKED_AR_WEIGHTS,
    StackedAR,
    StackInit,
    base_state_checksum,
)
from lit_star.models.vq import CONFIG_FILE as VQ_CONFIG_FILE
from lit_star.models.vq import VQConfig, VQModel, vq_config
from lit_star.modules.schedules import check_global_batch_size, lr_multiplier

ActivationCheckpointing = Literal["base", "stack"]
# State-dict prefixes of the frozen parts; they never enter a checkpoint (see the module docstring).
FROZEN_STATE_PREFIXES = ("model.stacked_ar.base.", "vq.")


class TextToImageObjective(nn.Module):
    """Laid-out batch -> mean image-token cross-entropy, in one ``forward``.

    Embedding, the frozen base, the stack and the chunked head all run inside this call, so that under
    FSDP2 this module is the root whose hooks enclose every sharded unit (FSDP2 requires the first
    forward of an iteration to go through the root).
    """

    def __init__(self, stacked_ar: StackedAR) -> None:
        super().__init__()
        self.stacked_ar = stacked_ar

    def forward(
        self, batch: SequenceBatch, code_vectors: torch.Tensor, predict_rows: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss, plus the teacher-forced argmax codes of the first ``predict_rows`` rows (for sample grids)."""
        model = self.stacked_ar
        embeds = model.embed_inputs(
            batch.input_ids, batch.code_mask, code_vectors, batch.pixel_values, batch.image_grid_thw
        )
        hidden = model(embeds, batch.position_ids, batch.attention_mask)
        loss = model.image_token_loss(hidden, batch.labels)
        predictions = []
        with torch.no_grad():
            for row in range(min(predict_rows, hidden.shape[0])):
                states = hidden[row][batch.labels[row] != IGNORE_INDEX]
                chunks = states.split(model.pixel_head.chunk_size)
                predictions.append(torch.cat([model.logits(chunk).argmax(-1) for chunk in chunks]))
        return loss, predictions


class StackedARModule(LightningModule):
    """Stage 2 LightningModule: :class:`~lit_star.models.stacked_ar.StackedAR` trained on text-to-image.

    Args:
        base_path: local Hugging Face Qwen2.5-VL directory (a released 3B/7B one, or the stage 0 export);
            its tokenizer and chat template lay out the sequences.
        vq_path: the frozen VQ: a ``VQModule`` Lightning checkpoint, a ``VQModel.save_pretrained``
            directory, or a reference ``VQ-Model.pt`` (then set ``vq_flavour``).
        vq_flavour: ``lit_star.models.vq.VQ_FLAVOURS`` name for a reference-layout VQ file.
        flavour: a ``lit_star.models.flavours.STACK_FLAVOURS`` name (``star-3b``, ``star-7b``, ``shapes``) that
            sets ``num_stack_layers`` and ``adapter_depth``; either given explicitly overrides it.
        num_stack_layers: N stacked decoder layers (16 for STAR-3B, 14 for STAR-7B).
        adapter_depth: Linear layers in the generation adapter (2 for STAR-3B, 4 for STAR-7B).
        stack_init: ``vlm`` (copies of the base's last N layers), ``llm`` (from ``llm_path``) or ``rand``.
        llm_path: text-only Hugging Face checkpoint with the base's layer architecture (``stack_init: llm``).
        stack_rope_theta: rotary base of the stacked layers (default: the base's); see ``StackedAR``.
        init_from: optional ``save_stacked_ar`` directory (e.g. ``python -m lit_star import-reference``
            output for STAR-3B/7B) whose trainable weights replace the initialisation, to fine-tune a
            released model. Its recorded base checksum must match ``base_path``.
        base_dtype: dtype the base is loaded in (``bfloat16`` for the real 3B/7B); the trainable modules
            are fp32 (master weights) whatever it is.
        cfg_dropout: probability that a training sample becomes the unconditional (CFG) row.
        packed_row_length: pack samples into rows of this many tokens (no padding); ``None`` pads.
        loss_chunk_size: positions whose codebook logits exist at once in the loss.
        learning_rate / betas / weight_decay / warmup_steps: AdamW after a linear warm-up of
            ``warmup_steps`` optimizer steps (0: none). The paper gives AdamW, lr 1e-3, constant;
            betas (0.9, 0.95) and no weight decay are LlamaGen's AR settings (the paper states none).
        lr_schedule / min_lr_ratio: ``constant`` (the paper's) or ``cosine`` decay to
            ``min_lr_ratio * learning_rate`` at ``trainer.max_steps``, for short runs that must end
            converged (see :func:`lit_star.modules.schedules.lr_multiplier`).
        global_batch_size: if set, fit refuses to start unless batch size x devices x nodes x gradient
            accumulation equals it (4096 in the paper's stage 2).
        activation_checkpointing: recompute the decoder layers of the ``base`` and/or the ``stack`` in
            backward instead of storing their activations.
        compile_layers: ``torch.compile`` every decoder layer of the base and the stack (after
            activation checkpointing, before FSDP2, torchtitan's order; the tests run it on one process
            only). Needs a C++ compiler, checked when the module is built. The Shapes stage 2 step runs
            1.23x faster on two CPU threads (``python -m lit_star bench train-step``); the first step
            pays the compilation (10-45 s there, depending on inductor's on-disk cache).
        log_images: validation samples whose ground truth and teacher-forced argmax codes are decoded by
            the VQ and shown in TensorBoard (0: none).
        seed: seeds the per-sample CFG dropout draws together with the epoch and the sample key, so the
            same sample gets the same draw on any number of devices and after a resume.
        reasoning_suffix: what sampling appends to the base's answer in reasoning mode, recorded in the
            checkpoint: the phrase the training captions end with (the reference's for STAR data; ``""`` for
            the Shapes world, whose captions have none).
        edit_vit_min_pixels / edit_vit_max_pixels / edit_min_image_side: the ViT input limits of an edit's
            source image (edit batches train in stage 4, which lays them out through this module); ``None``:
            the base's default, which for a Qwen2.5-VL base is the reference's 28*28*16, 28*28*576 and 28, and
            for another geometry the processor's own (:func:`lit_star.models.edit_source.default_vit_limits`).
    """

    def __init__(
        self,
        base_path: str,
        vq_path: str,
        vq_flavour: str | None = None,
        flavour: str | None = None,
        num_stack_layers: int | None = None,
        adapter_depth: int | None = None,
        stack_init: StackInit = "vlm",
        llm_path: str | None = None,
        stack_rope_theta: float | None = None,
        init_from: str | None = None,
        base_dtype: str = "float32",
        cfg_dropout: float = 0.1,
        packed_row_length: int | None = None,
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.0,
        global_batch_size: int | None = None,
        activation_checkpointing: Sequence[ActivationCheckpointing] = (),
        compile_layers: bool = False,
        log_images: int = 4,
        seed: int = 0,
        reasoning_suffix: str = REFERENCE_REASONING_SUFFIX,
        edit_vit_min_pixels: int | None = None,
        edit_vit_max_pixels: int | None = None,
        edit_min_image_side: int | None = None,
    ) -> None:
        super().__init__()
        try:
            self.edit_vit_limits = VitPixelLimits(edit_vit_min_pixels, edit_vit_max_pixels, edit_min_image_side)
        except ValueError as error:
            raise ValueError(f"model.init_args.edit_vit_* / edit_min_image_side: {error}") from None
        if flavour is not None:
            spec = stack_flavour(flavour)
            num_stack_layers = spec.num_stack_layers if num_stack_layers is None else num_stack_layers
            adapter_depth = spec.adapter_depth if adapter_depth is None else adapter_depth
        if num_stack_layers is None or adapter_depth is None:
            raise ValueError("set model.init_args.flavour (e.g. star-3b) or both model.init_args.num_stack_layers "
                             "and model.init_args.adapter_depth")
        unknown = sorted(set(activation_checkpointing) - {"base", "stack"})
        if unknown:
            raise ValueError(f"activation_checkpointing takes 'base' and/or 'stack', got {unknown}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if stack_rope_theta is not None and stack_rope_theta <= 0:  # before the base is loaded
            raise ValueError(f"stack_rope_theta must be > 0, got {stack_rope_theta}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if compile_layers:
            require_compile_toolchain("model.init_args.compile_layers")
        self.save_hyperparameters()
        # The resolved sizes (LightningCLI saves the values as given, which may be None under a flavour).
        self.hparams.update(num_stack_layers=num_stack_layers, adapter_depth=adapter_depth)
        self.model: TextToImageObjective | None = None
        self.vq: VQModel | None = None
        self.frozen_checksums: dict[str, str] = {}
        self._layout: SequenceLayout | None = None
        self._image_processor = None
        # Validation accumulators, reset at each validation epoch start.
        self._val_loss_sum: torch.Tensor | None = None
        self._val_unconditional_loss_sum: torch.Tensor | None = None
        self._val_loss_count = 0
        self._val_code_counts: torch.Tensor | None = None
        # Checkpoints and state_dict() leave the frozen weights out; loading then does not miss them.
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_state)

    # ---- model construction -------------------------------------------------------------------

    @property
    def stacked_ar(self) -> StackedAR:
        if self.model is None:
            raise RuntimeError("the model is built in configure_model(); run through a Trainer or call it first")
        return self.model.stacked_ar

    def configure_model(self) -> None:
        """Load (or, under a meta-device context, only build) base, stack and VQ; then apply the plans.

        Under ``torch.device("meta")`` (Lightning's empty init, or parameter counting) the architecture is
        built from the configs in ``base_path`` / the VQ flavour without reading any weights.
        """
        if self.model is not None:
            return
        self.build_model()
        self._apply_parallelism_plan()

    def build_model(self) -> None:
        """:meth:`configure_model` without the parallelism plan (stage 4 applies one plan over both models).

        A VQ already set on ``self.vq`` (stage 4 shares one between its models) is used instead of loading one.
        """
        if self.model is not None:
            return
        hp = self.hparams
        empty = torch.get_default_device().type == "meta"
        base = _empty_base(hp.base_path, hp.base_dtype) if empty else load_base_vlm(hp.base_path, dtype=hp.base_dtype)
        if self.vq is None:
            self.vq = _empty_vq(hp.vq_path, hp.vq_flavour) if empty else load_vq(hp.vq_path, hp.vq_flavour)
        self.vq.requires_grad_(False).eval()
        if not empty:
            # Before anything can touch them: this is "what was loaded".
            self.frozen_checksums = {"base": base_state_checksum(base), "vq": base_state_checksum(self.vq)}
        stacked_ar = StackedAR(
            base,
            num_stack_layers=hp.num_stack_layers,
            adapter_depth=hp.adapter_depth,
            codebook_size=self.vq.config.codebook_size,
            codebook_dim=self.vq.config.codebook_embed_dim,
            stack_init=hp.stack_init,
            llm_path=hp.llm_path,
            dtype=torch.float32,
            stack_rope_theta=hp.stack_rope_theta,
        )
        stacked_ar.pixel_head.chunk_size = hp.loss_chunk_size
        if hp.init_from is not None and not empty:
            self._load_trainable_weights(stacked_ar, Path(hp.init_from))
        self.model = TextToImageObjective(stacked_ar)
        rank_zero_info(
            f"stage 2 parameters: stack ({hp.num_stack_layers} layers, {hp.stack_init} init) "
            f"{_count(stacked_ar.stack):,}, adapter {_count(stacked_ar.adapter):,}, "
            f"pixel head {_count(stacked_ar.pixel_head):,}, frozen base {_count(base):,}"
        )

    def _apply_parallelism_plan(self) -> None:
        """:func:`~lit_star.distributed.stacked_ar.parallelize_stacked_ar`, FSDP2 under ``ModelParallelStrategy``."""
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        mesh = self.device_mesh["data_parallel"] if sharded else None
        compile_layers = self.hparams.compile_layers and torch.get_default_device().type != "meta"
        counts = parallelize_stacked_ar(self.model, self.stacked_ar, self.hparams.activation_checkpointing,
                                        compile_layers, mesh)
        if counts["compiled"]:
            rank_zero_info(f"stage 2: torch.compile on {counts['compiled']} decoder layers (base and stack)")
        if mesh is not None:
            rank_zero_info(f"stage 2: FSDP2 over {mesh.size()} ranks, {counts['sharded']} units + root")

    def _load_trainable_weights(self, stacked_ar: StackedAR, directory: Path) -> None:
        from safetensors.torch import load_file

        config_file, weights_file = directory / STACKED_AR_CONFIG, directory / STACKED_AR_WEIGHTS
        for path in (config_file, weights_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"init_from: {path} not found (write it with save_stacked_ar or python -m lit_star import-reference)"
                )
        config = json.loads(config_file.read_text())
        if config["base_checksum"] != self.frozen_checksums["base"]:
            raise FrozenWeightsChangedError(
                f"init_from: {directory} was trained on a base with checksum {config['base_checksum'][:16]}..., "
                f"{self.hparams.base_path} has {self.frozen_checksums['base'][:16]}..."
            )
        stacked_ar.load_trainable_state_dict(load_file(str(weights_file)))
        rank_zero_info(f"stage 2: trainable weights initialised from {directory}")

    def train(self, mode: bool = True) -> StackedARModule:
        super().train(mode)
        if self.vq is not None:
            self.vq.eval()  # frozen; StackedAR.train keeps its base in eval itself
        return self

    @property
    def layout(self) -> SequenceLayout:
        if self._layout is None:
            tokenizer = AutoTokenizer.from_pretrained(self.hparams.base_path, local_files_only=True)
            self._layout = SequenceLayout(tokenizer, self.stacked_ar.base.config, cfg_dropout=self.hparams.cfg_dropout)
        return self._layout

    # ---- batches ------------------------------------------------------------------------------

    def batch_codes(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """B x h x w codes: the pre-tokenized ``codes`` if present, else the frozen VQ's encoding of ``image``."""
        if "codes" in batch:
            codes = batch["codes"].long()
        elif "image" in batch:
            with torch.no_grad():
                codes = self.vq.encode_to_codes(batch["image"].to(self.device, torch.float32))
        else:
            raise KeyError(f"a text-to-image batch needs 'codes' or 'image'; got keys {sorted(batch)}")
        # Sampling needs the trained image side; pre-tokenized data gives only the code grid.
        self.trained_image_size = int(codes.shape[-1]) * self.vq.config.downsample_factor
        return codes

    def layout_batch(
        self, batch: Mapping[str, Any], codes: torch.Tensor, cfg_dropout: bool, unconditional: bool = False
    ) -> SequenceBatch:
        """Text-to-image sequences of ``batch`` (captions) and ``codes``, collated, on this device.

        ``cfg_dropout`` draws the unconditional (CFG) row per sample as in training; ``unconditional``
        makes every row unconditional.
        """
        for key in ("caption", "__key__"):
            if key not in batch:
                raise KeyError(f"a text-to-image batch needs {key!r}; got keys {sorted(batch)}")
        layout = self.layout
        samples = []
        for caption, sample_key, sample_codes in zip(batch["caption"], batch["__key__"], codes.cpu()):
            drop = unconditional or (cfg_dropout and layout.draw_unconditional(self._sample_rng(sample_key)))
            samples.append(layout.text_to_image(caption, sample_codes, unconditional=drop))
        return self._collate(samples)

    @property
    def image_processor(self):
        """The base's image processor (ViT inputs of edit sources), loaded on first use."""
        if self._image_processor is None:
            self._image_processor = load_processor(self.hparams.base_path).image_processor
        return self._image_processor

    def edit_sources(self, source_images: torch.Tensor | Sequence[torch.Tensor], vq_size: int) -> list[SourceImage]:
        """Both encodings of each source image (``3 x H x W`` in [-1, 1], any size: ``EditDataModule`` keeps the
        stored one), exactly as the sampler encodes an edit's source
        (:func:`~lit_star.models.edit_source.encode_edit_source`: stretch for the VQ, own aspect for the ViT)."""
        return [encode_edit_source(self.vq, self.image_processor, tensor_to_image(image), vq_size,
                                   self.edit_vit_limits) for image in source_images]

    def layout_edit_batch(
        self, batch: Mapping[str, Any], target_codes: torch.Tensor, sources: Sequence[SourceImage], cfg_dropout: bool
    ) -> SequenceBatch:
        """Edit sequences (reference layout: source VQ codes and ViT features in the user turn, then the target
        codes; loss on the target codes only), collated, on this device. CFG dropout as in the reference's edit
        guidance: the unconditional row blanks the instruction and keeps both image encodings."""
        for key in ("instruction", "__key__"):
            if key not in batch:
                raise KeyError(f"an edit batch needs {key!r}; got keys {sorted(batch)}")
        layout = self.layout
        samples = []
        for instruction, sample_key, codes, source in zip(batch["instruction"], batch["__key__"], target_codes.cpu(),
                                                          sources):
            drop = cfg_dropout and layout.draw_unconditional(self._sample_rng(sample_key))
            samples.append(layout.edit(instruction, source.codes, source.image_grid_thw, codes, source.pixel_values,
                                       unconditional=drop))
        return self._collate(samples)

    def _collate(self, samples: list) -> SequenceBatch:
        pad = self.layout.special.pad
        if self.hparams.packed_row_length is None:
            collated = collate_padded(samples, pad)
        else:
            collated = collate_packed(samples, self.hparams.packed_row_length, pad)
        return collated.to(self.device)

    def _sample_rng(self, sample_key: str) -> random.Random:
        # String seeds are hashed deterministically (unlike hash()), across processes and runs.
        return random.Random(f"{self.hparams.seed}:{self.current_epoch}:{sample_key}")

    def _code_vectors(self, code_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vq.codebook_vectors(code_ids.to(self.device))

    # ---- steps --------------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        sequences = self.layout_batch(batch, self.batch_codes(batch), cfg_dropout=True)
        loss, _ = self.model(sequences, self._code_vectors(sequences.code_ids))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_unconditional_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_loss_count = 0
        self._val_code_counts = torch.zeros(self.stacked_ar.codebook_size, dtype=torch.float64, device=self.device)

    # With compilation on, a few validation batches would pay for compiling a second (no-grad) graph.
    @torch.compiler.set_stance("force_eager")
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        codes = self.batch_codes(batch)
        sequences = self.layout_batch(batch, codes, cfg_dropout=False)
        show = self.hparams.log_images if batch_idx == 0 else 0
        loss, predictions = self.model(sequences, self._code_vectors(sequences.code_ids), predict_rows=show)
        targets = sequences.labels[sequences.labels != IGNORE_INDEX]
        # The same images without their prompts: the gap to ``loss`` is what the text is worth.
        unconditional = self.layout_batch(batch, codes, cfg_dropout=False, unconditional=True)
        unconditional_loss, _ = self.model(unconditional, self._code_vectors(unconditional.code_ids))
        self._val_loss_sum += loss.double() * targets.numel()
        self._val_unconditional_loss_sum += unconditional_loss.double() * targets.numel()
        self._val_loss_count += targets.numel()
        self._val_code_counts += torch.bincount(targets, minlength=self._val_code_counts.numel()).double()
        if predictions:
            shown = codes[: len(predictions)]
            self._log_sample_grid(shown, torch.stack(predictions).view_as(shown))

    def on_validation_epoch_end(self) -> None:
        if self._val_loss_count == 0:
            return
        reduce = self.trainer.strategy.reduce
        loss_sum = reduce(self._val_loss_sum, reduce_op="sum")
        unconditional_sum = reduce(self._val_unconditional_loss_sum, reduce_op="sum")
        count = reduce(torch.tensor(float(self._val_loss_count), device=self.device), reduce_op="sum")
        counts = reduce(self._val_code_counts, reduce_op="sum")
        self.log("val/loss", (loss_sum / count).float(), prog_bar=True, sync_dist=False)
        self.log("val/loss_unconditional", (unconditional_sum / count).float(), sync_dist=False)
        # Nats per image token the prompt saves; near 0 means the stack draws without reading the text.
        self.log("val/prompt_gain", ((unconditional_sum - loss_sum) / count).float(), sync_dist=False)
        # The loss of the best context-free predictor of these codes: the bar the model has to clear.
        self.log("val/code_unigram_entropy", unigram_entropy(counts).float(), sync_dist=False)

    def _log_sample_grid(self, codes: torch.Tensor, predicted: torch.Tensor) -> None:
        """Top row: VQ decode of the true codes; bottom row: of the teacher-forced argmax predictions."""
        from lit_star.modules.vq_module import image_grid

        experiment = getattr(self.logger, "experiment", None)
        if not (self.trainer.is_global_zero and hasattr(experiment, "add_image")):
            return
        with torch.no_grad():
            grid = image_grid([self.vq.decode_codes(codes), self.vq.decode_codes(predicted)])
        experiment.add_image("val/true_vs_teacher_forced_codes", grid, self.global_step)

    # ---- optimisation -------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        check_global_batch_size(self.trainer, self.hparams.global_batch_size)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable,
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        total_steps = self.trainer.max_steps
        if self.hparams.lr_schedule != "constant" and (total_steps is None or total_steps <= 0):
            raise ValueError(f"lr_schedule {self.hparams.lr_schedule!r} needs trainer.max_steps > 0")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            partial(
                lr_multiplier,
                total_steps=total_steps,
                schedule=self.hparams.lr_schedule,
                warmup_steps=self.hparams.warmup_steps,
                min_lr_ratio=self.hparams.min_lr_ratio,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------

    def verify_frozen_weights(self) -> None:
        """Recompute the frozen checksums; raise if either differs from the one recorded at load.

        Under FSDP2 the sharded base is gathered tensor by tensor, so every rank must call this together.
        """
        current = {"base": base_state_checksum(self.stacked_ar.base), "vq": base_state_checksum(self.vq)}
        changed = [name for name in current if current[name] != self.frozen_checksums[name]]
        if changed:
            raise FrozenWeightsChangedError(
                f"frozen {', '.join(changed)} weights changed since they were loaded "
                f"({', '.join(f'{n}: {self.frozen_checksums[n][:16]}... -> {current[n][:16]}...' for n in changed)}); "
                "refusing to save a checkpoint of a run whose frozen weights were modified"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.verify_frozen_weights()
        checkpoint[FROZEN_CHECKSUMS_KEY] = dict(self.frozen_checksums)
        # What lit_star.checkpoints.load_stage2 needs to rebuild the model without this module.
        checkpoint[STACKED_AR_CONFIG_KEY] = {key: self.hparams[key] for key in STACKED_AR_FIELDS}
        if getattr(self, "trained_image_size", None):
            checkpoint[IMAGE_SIZE_KEY] = self.trained_image_size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(FROZEN_CHECKSUMS_KEY)
        if recorded is None:
            raise KeyError(f"checkpoint has no {FROZEN_CHECKSUMS_KEY!r}: not a StackedARModule checkpoint")
        changed = [name for name in ("base", "vq") if recorded.get(name) != self.frozen_checksums.get(name)]
        if changed:
            paths = {"base": self.hparams.base_path, "vq": self.hparams.vq_path}
            raise FrozenWeightsChangedError(
                "the checkpoint was trained on different frozen weights than "
                + ", ".join(f"{name} at {paths[name]}" for name in changed)
                + "; point base_path / vq_path at the ones it was trained with"
            )


def unigram_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the empirical code distribution ``counts``: the cross-entropy of a unigram model."""
    probabilities = counts[counts > 0] / counts.sum()
    return -(probabilities * probabilities.log()).sum()


def _drop_frozen_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.removeprefix(prefix).startswith(FROZEN_STATE_PREFIXES)]:
        del state_dict[key]


def _ignore_missing_frozen_state(module: nn.Module, incompatible_keys) -> None:
    frozen = [k for k in incompatible_keys.missing_keys if k.startswith(FROZEN_STATE_PREFIXES)]
    for key in frozen:
        incompatible_keys.missing_keys.remove(key)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _empty_base(base_path: str, dtype: str) -> Qwen2_5_VLForConditionalGeneration:
    config = AutoConfig.from_pretrained(base_path, local_files_only=True)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))


def _empty_vq(vq_path: str, vq_flavour: str | None) -> VQModel:
    if vq_flavour is not None:
        config = vq_config(vq_flavour, codebook_projector=False)
    elif (Path(vq_path) / VQ_CONFIG_FILE).is_file():
        config = VQConfig.from_dict(json.loads((Path(vq_path) / VQ_CONFIG_FILE).read_text()))
    else:
        raise ValueError(
            f"an empty (meta) build needs vq_flavour or a VQ directory with {VQ_CONFIG_FILE}; got vq_path={vq_path}"
        )
    return VQModel(config)
