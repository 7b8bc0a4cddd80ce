"""Stage 0: train the tiny base VLM on the Shapes world's understanding data, then export it.

    python -m lit_star fit --config recipes/shapes/stage0_base.yaml --config recipes/trainer/cpu.yaml

STAR starts from a pretrained VLM; the Shapes world has none, so this stage makes one. A tiny
Qwen2.5-VL learns VQA, caption requests (both with an image) and knowledge riddles (text only) with
next-token cross-entropy on the assistant's answer tokens only. Validation answers greedily and
scores exact match. At the end of training the model, tokenizer and image processor are written as
a Hugging Face directory that stage 2 loads exactly as it would load Qwen2.5-VL-3B.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from transformers import Qwen2_5_VLForConditionalGeneration

from lit_star.checkpoints import BASE_CONFIG_KEY, BASE_FILES_KEY
from lit_star.data.health import DATA_HEALTH_KEY
from lit_star.data.webdataset_io import TASK_KEY
from lit_star.eval.grading import answer_is_correct, normalize_answer
from lit_star.models.base_vlm import (
    IGNORE_INDEX,
    Qwen2_5_VLImageTextProcessor,
    build_image_processor,
    build_tiny_base_vlm,
    encode_chat,
    generate_answers,
    images_to_uint8,
    load_processor,
    pixel_statistics,
    save_base_vlm,
    tiny_spec,
)
from lit_star.models.tokenizer import train_qwen2_tokenizer
from lit_star.modules.schedules import lr_multiplier

# Text fields of the world's understanding batches (README.md, "The Shapes world and its data schema") that the tokenizer is trained on.
CORPUS_FIELDS = ("question", "answer", "prompt")


def task_batches(batch: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield ``("vqa", b)`` / ``("riddle", b)`` for a batch in README.md's batch format or a mapping of such batches.

    A VQA batch has ``image``/``question``/``answer``; a knowledge batch has ``prompt``/``answer``
    (``batch["task"]``, when the data layer sets it, must agree). Mixtures come either as one of
    those per step (`MixtureDataModule`) or as ``{name: batch}`` (Lightning's CombinedLoader).
    """
    task = batch.get(TASK_KEY)
    if "question" in batch and task in (None, "vqa"):
        yield "vqa", batch
    elif "prompt" in batch and task in (None, "knowledge"):
        yield "riddle", batch
    elif task is None and batch and all(isinstance(v, Mapping) for k, v in batch.items() if k != DATA_HEALTH_KEY):
        for name, sub in batch.items():
            if name != DATA_HEALTH_KEY:
                yield from task_batches(sub)
    else:
        raise KeyError(
            f"batch (task={task!r}, keys {sorted(batch)}) is neither VQA (question/answer/image) "
            "nor knowledge (prompt/answer)"
        )


class BaseVLMModule(LightningModule):
    """Stage 0 LightningModule: a tiny Qwen2.5-VL trained on the world's understanding data.

    Args:
        processor_dir: where the world's processor lives (tokenizer + image statistics). If it holds
            one it is loaded (so a resumed run keeps its vocabulary); otherwise a byte-level BPE is
            trained on the text of the first ``processor_fit_batches`` training batches, the pixel
            mean/std are measured on their images, and both are saved there.
        flavour: tiny base size, a key of ``lit_star.models.base_vlm.TINY_FLAVOURS``.
        flavour_overrides: fields of its :class:`~lit_star.models.base_vlm.TinyBaseSpec` to change
            (e.g. ``{vision_hidden_size: 128}``); an unknown field is an error.
        tokenizer_vocab_size: BPE vocabulary size, special tokens excluded.
        export_dir: Hugging Face directory written at the end of training (skipped if None).
        learning_rate / weight_decay / warmup_steps / min_lr_ratio: AdamW with linear warm-up and
            cosine decay to ``min_lr_ratio * learning_rate`` at ``trainer.max_steps``.
        vision_lr_scale: the vision tower's (``model.visual.*``) learning rate as a multiple of
            ``learning_rate``. Randomly initialised, it sits behind the merger and every LLM layer, so its
            gradients arrive small while the text prior is learned within a few hundred steps.
        max_new_tokens: greedy decoding budget at validation.
        loss_normalization: ``"sample"`` averages each answer's token losses, then the answers, so a
            one-word VQA answer weighs as much as a 30-token scene description; ``"token"`` averages
            over all answer tokens of the batch. With ``"token"`` the descriptions' mostly predictable
            wording made up ~80% of the loss, and the tiny model learned the text prior while its vision
            tower collapsed to a constant output (colour questions at chance after 900 steps).
        question_types: the VQA question types (``meta["qtype"]``) whose accuracy is logged one by one
            (``val/vqa_accuracy_<type>``); a validation sample of another type is an error. ``None``: every
            type the validation data carries gets its own metric.
    """

    def __init__(
        self,
        processor_dir: str,
        flavour: str = "tiny",
        flavour_overrides: dict[str, Any] | None = None,
        tokenizer_vocab_size: int = 1024,
        processor_fit_batches: int = 100,
        export_dir: str | None = None,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        vision_lr_scale: float = 1.0,
        max_new_tokens: int = 32,
        loss_normalization: str = "sample",
        question_types: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if loss_normalization not in ("sample", "token"):
            raise ValueError(f"loss_normalization must be 'sample' or 'token', got {loss_normalization!r}")
        self.save_hyperparameters()
        self.spec = tiny_spec(flavour, flavour_overrides)
        self.model: Qwen2_5_VLForConditionalGeneration | None = None
        self.processor: Qwen2_5_VLImageTextProcessor | None = None
        self.val_loss = MeanMetric()
        self.val_vqa_accuracy = MeanMetric()
        self.val_vqa_exact_match = MeanMetric()
        self.val_riddle_accuracy = MeanMetric()
        self.val_qtype_accuracy = nn.ModuleDict({qtype: MeanMetric() for qtype in question_types or ()})

    # ---- model construction -------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.processor = self._world_processor()
        self.model = build_tiny_base_vlm(self.processor.tokenizer, self.spec)
        n_params = sum(p.numel() for p in self.model.parameters())
        rank_zero_info(
            f"stage 0 base: flavour={self.hparams.flavour} vocab={len(self.processor.tokenizer)} params={n_params / 1e6:.2f}M"
        )

    def _world_processor(self) -> Qwen2_5_VLImageTextProcessor:
        """The world's tokenizer and image statistics: loaded from ``processor_dir``, else fitted on the training data."""
        processor_dir = Path(self.hparams.processor_dir)
        if (processor_dir / "tokenizer.json").is_file() and (processor_dir / "preprocessor_config.json").is_file():
            return load_processor(processor_dir)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise FileNotFoundError(
                f"no processor in {processor_dir} and no datamodule to fit one on; run stage 0 through a Trainer"
            )
        if self.trainer.is_global_zero:
            texts, images = self._training_sample(datamodule)
            tokenizer = train_qwen2_tokenizer(texts, vocab_size=self.hparams.tokenizer_vocab_size)
            image_mean, image_std = pixel_statistics(images)
            rank_zero_info(f"stage 0 image statistics: mean={image_mean} std={image_std}")
            image_processor = build_image_processor(self.spec, image_mean, image_std)
            tokenizer.save_pretrained(processor_dir)
            image_processor.save_pretrained(processor_dir)
        # Every rank loads rank 0's copy, so all hold the same vocabulary and statistics.
        self.trainer.strategy.barrier("stage0_processor")
        return load_processor(processor_dir)

    def _training_sample(self, datamodule) -> tuple[list[str], list[torch.Tensor]]:
        """Text and images of the first ``processor_fit_batches`` training batches."""
        texts: list[str] = []
        images: list[torch.Tensor] = []
        batches = 0
        for batch in datamodule.train_dataloader():
            for kind, part in task_batches(batch):
                for field in CORPUS_FIELDS:
                    texts.extend(part.get(field, ()))
                if kind == "vqa":
                    images.append(part["image"])
            batches += 1
            if batches >= self.hparams.processor_fit_batches:
                break
        if not texts or not images:
            raise ValueError(
                f"{type(datamodule).__name__} yielded {len(texts)} texts and {len(images)} image batches in "
                f"{batches} batches; stage 0 needs both (VQA and knowledge data)"
            )
        rank_zero_info(f"stage 0 processor: fitted on {len(texts)} strings and {sum(len(i) for i in images)} images")
        return texts, images

    # ---- steps --------------------------------------------------------------------------------

    def _encode(self, kind: str, part: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Full conversations with answer-only labels."""
        answers = list(part["answer"])
        if kind == "vqa":
            inputs = encode_chat(self.processor, list(part["question"]), images_to_uint8(part["image"]), answers)
        else:
            inputs = encode_chat(self.processor, list(part["prompt"]), None, answers)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _answer_losses(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean cross-entropy over answer tokens, and each sample's answer-token count."""
        labels = inputs.pop("labels")
        logits = self.model(**inputs).logits
        targets = labels[:, 1:]
        token_losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        if (counts == 0).any():
            raise ValueError("a sample has no answer tokens (empty answer?)")
        return token_losses.sum(dim=1) / counts, counts

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        sample_losses, counts = [], []
        for kind, part in task_batches(batch):
            losses, n_tokens = self._answer_losses(self._encode(kind, part))
            self.log(f"train/loss_{kind}", losses.mean(), batch_size=len(losses))
            sample_losses.append(losses)
            counts.append(n_tokens)
        losses, n_tokens = torch.cat(sample_losses), torch.cat(counts)
        if self.hparams.loss_normalization == "sample":
            loss = losses.mean()
        else:
            loss = (losses * n_tokens).sum() / n_tokens.sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(losses))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        for kind, part in task_batches(batch):
            losses, _ = self._answer_losses(self._encode(kind, part))
            self.val_loss.update(losses)
            questions = list(part["question"] if kind == "vqa" else part["prompt"])
            images = images_to_uint8(part["image"]) if kind == "vqa" else None
            predictions = generate_answers(
                self.model, self.processor, questions, images, max_new_tokens=self.hparams.max_new_tokens
            )
            exact = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, part["answer"])]
            if kind == "riddle":
                self.val_riddle_accuracy.update(torch.tensor(exact, dtype=torch.float32))
                continue
            for ok, prediction, answer, meta, key in zip(exact, predictions, part["answer"], part["meta"], part["__key__"]):
                qtype = meta.get("qtype")
                if qtype not in self.val_qtype_accuracy:
                    if self.hparams.question_types is not None:
                        raise KeyError(
                            f"VQA sample {key!r} has qtype {qtype!r}; model.init_args.question_types lists "
                            f"{list(self.hparams.question_types)}"
                        )
                    self.val_qtype_accuracy[str(qtype)] = MeanMetric().to(self.device)
                correct = answer_is_correct(prediction, answer, qtype)
                self.val_vqa_exact_match.update(float(ok))
                self.val_vqa_accuracy.update(float(correct))
                self.val_qtype_accuracy[qtype].update(float(correct))

    def on_validation_epoch_end(self) -> None:
        metrics = {
            "val/loss": self.val_loss,
            "val/vqa_accuracy": self.val_vqa_accuracy,
            "val/vqa_exact_match": self.val_vqa_exact_match,
            "val/riddle_accuracy": self.val_riddle_accuracy,
        }
        metrics.update({f"val/vqa_accuracy_{q}": m for q, m in self.val_qtype_accuracy.items()})
        for name, metric in metrics.items():
            # A metric that saw no sample (e.g. a qtype absent from a short validation) stays unlogged.
            if metric.update_count:
                self.log(name, metric.compute(), prog_bar=name != "val/loss", sync_dist=False)
            metric.reset()

    # ---- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self):
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            # Norm gains, biases and embedding rows are not shrunk towards zero.
            decays = param.ndim >= 2 and "embed_tokens" not in name
            groups.setdefault((decays, ".visual." in f".{name}"), []).append(param)
        lr = self.hparams.learning_rate
        optimizer = torch.optim.AdamW(
            [
                {
                    "params": params,
                    "weight_decay": self.hparams.weight_decay if decays else 0.0,
                    "lr": lr * (self.hparams.vision_lr_scale if vision else 1.0),
                }
                for (decays, vision), params in sorted(groups.items())
            ],
            lr=lr,
            betas=tuple(self.hparams.betas),
        )
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps <= 0:
            raise ValueError("stage 0 needs trainer.max_steps > 0 for its cosine schedule")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            partial(
                lr_multiplier,
                total_steps=total_steps,
                schedule="cosine",
                warmup_steps=self.hparams.warmup_steps,
                min_lr_ratio=self.hparams.min_lr_ratio,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints and export ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Enough to rebuild the Hugging Face directory from the checkpoint alone (export_base_checkpoint).
        checkpoint[BASE_CONFIG_KEY] = self.model.config.to_dict()
        checkpoint[BASE_FILES_KEY] = _processor_files(self.processor)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(BASE_FILES_KEY)
        if saved is None or self.processor is None:
            return
        current = _processor_files(self.processor)
        for name in ("tokenizer.json", "preprocessor_config.json"):
            if saved.get(name) != current.get(name):
                raise ValueError(
                    f"{name} in {self.hparams.processor_dir} differs from the one this checkpoint was trained with"
                )

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            out = save_base_vlm(self.model, self.processor, self.hparams.export_dir)
            rank_zero_info(f"stage 0 base exported to {out}")


def _processor_files(processor: Qwen2_5_VLImageTextProcessor) -> dict[str, str]:
    """The tokenizer and image-processor files of ``processor``, as ``{file name: text}``."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}
