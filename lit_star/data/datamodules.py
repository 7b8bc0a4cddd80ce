"""LightningDataModules over webdataset shards, one per kind of sample, plus a weighted mixture.

Recipes build them from YAML, for example on the Shapes world (``python -m lit_star data shapes --out DIR``)::

    data:
      class_path: lit_star.data.ImageTextDataModule
      init_args:
        train_shards: DIR/t2i/train-*.tar
        val_shards: DIR/t2i/val-*.tar
        resolution: 64
        batch_size: 32
        num_workers: 2

Your own shards work the same way: point ``train_shards`` at them (globs, brace patterns such as
``/data/laion/{000000..000999}.tar``, URLs or ``pipe:`` commands) and name their members with the
``*_key`` arguments (``image_key: jpg;png`` takes whichever is present).
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl

from lit_star.data.health import DEFAULT_MAX_SKIP_FRACTION
from lit_star.data.webdataset_io import (
    Field,
    SampleDecoder,
    ShardLoader,
    ShardStream,
    WeightedBatchMixture,
    expand_shards,
)

ShardSpec = str | list[str]


class ResumableTrainStream:
    """Passes a resume position to the next training loader the DataModule builds.

    ``lit_star.resume.ExactResume`` calls `resume_training_stream` while a checkpoint is restored, before
    Lightning asks for the training loader; that loader then starts after the last batch trained on.
    """

    _train_resume: tuple[dict, bool] | None = None

    def resume_training_stream(self, position: dict, epoch_finished: bool) -> None:
        self._train_resume = (position, epoch_finished)

    def _resumed(self, loader: ShardLoader | WeightedBatchMixture) -> ShardLoader | WeightedBatchMixture:
        if self._train_resume is not None:
            loader.resume_from(*self._train_resume)
            self._train_resume = None
        return loader


class ShardDataModule(ResumableTrainStream, pl.LightningDataModule):
    """Shared machinery: shard expansion, deterministic streams and loaders for train / val / test.

    Args:
        train_shards, val_shards, test_shards: shard specs (glob, brace pattern, ``::``-joined list,
            URL or a list of these). Val / test are optional; without them there is no such loop.
        batch_size: training batch size per rank; ``val_batch_size`` defaults to it.
        num_workers: loader worker processes per rank. Shards are split across ranks, then workers;
            workers beyond the shard count stay idle.
        seed: fixes shard order, sample shuffling and worker seeds (with the epoch).
        shuffle_buffer: samples held per worker for shuffling the training stream (0: none).
        shuffle_shards: reshuffle the training shard order every epoch.
        batches_per_epoch: fixed training epoch length per rank, cycling over the shards; set it under
            DDP whenever shards hold unequal sample counts, so every rank runs the same number of steps.
            ``None``: one pass over the shards.
        drop_last: drop each worker's last partial training batch.
        max_skip_fraction: skipped/seen ratio past which `DataHealthMonitor` stops the run.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    task: ClassVar[str]
    resolution: int | None = None  # image fields' size; subclasses with images set it

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        batches_per_epoch: int | None = None,
        drop_last: bool = False,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shard_specs = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.batches_per_epoch = batches_per_epoch
        self.drop_last = drop_last
        self.max_skip_fraction = max_skip_fraction
        self.pin_memory = pin_memory
        self.decoder = SampleDecoder(self.fields(), self.resolution)

    def fields(self) -> list[Field]:
        """The batch entries this kind of sample has, in README.md's batch format ("The Shapes world and its data schema") (each subclass defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define fields()")

    def shards(self, split: str) -> list[str] | None:
        spec = self.shard_specs[split]
        return None if spec is None else expand_shards(spec)

    def setup(self, stage: str | None = None) -> None:
        # Expanding every split now makes a wrong val / test path fail before training, not after it.
        for split in ("train", "val", "test"):
            self.shards(split)

    def stream(self, split: str) -> ShardStream | None:
        shards = self.shards(split)
        if shards is None:
            return None
        training = split == "train"
        return ShardStream(
            shards,
            self.decoder,
            self.batch_size if training else self.val_batch_size,
            seed=self.seed,
            shuffle_shards=self.shuffle_shards and training,
            shuffle_buffer=self.shuffle_buffer if training else 0,
            batches_per_epoch=self.batches_per_epoch if training else None,
            drop_last=self.drop_last and training,
            allow_idle_ranks=not training,
            task=self.task,
        )

    def loader(self, split: str) -> ShardLoader | None:
        stream = self.stream(split)
        if stream is None:
            return None
        return ShardLoader(
            stream,
            num_workers=self.num_workers,
            seed=self.seed,
            epoch_fn=self._trainer_epoch,
            pin_memory=self.pin_memory,
        )

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def train_dataloader(self) -> ShardLoader:
        loader = self.loader("train")
        if loader is None:
            raise ValueError(f"{type(self).__name__}: train_shards is not set")
        return self._resumed(loader)

    def val_dataloader(self) -> ShardLoader | list:
        loader = self.loader("val")
        return [] if loader is None else loader

    def test_dataloader(self) -> ShardLoader | list:
        loader = self.loader("test")
        return [] if loader is None else loader


def _meta(meta_key: str | None) -> Field:
    return Field("meta", meta_key, "json")


class ImageTextDataModule(ShardDataModule):
    """Image + caption (text-to-image, captioning). Batch: image, caption, meta, __key__, [codes].

    Args:
        resolution: images are resized (shorter side) and centre-cropped to this square size.
        image_key: image member, e.g. ``png`` or ``jpg;png``; ``None`` to read only pre-tokenized codes.
        caption_key, meta_key: caption text and JSON metadata members (``meta_key: null`` for none).
        codes_key: pre-tokenized code grid (``codes.npy`` after ``python -m lit_star tokenize``); ``None`` skips it.
        latents_key: pre-extracted VAE posterior (``latents.npy`` after ``tokenize --vae``; stage 3); ``None`` skips it.
        **kwargs: the shard, batching and seeding arguments of `ShardDataModule`.
    """

    task = "image_text"

    def __init__(
        self,
        resolution: int = 64,
        image_key: str | None = "png",
        caption_key: str = "txt",
        meta_key: str | None = "json",
        codes_key: str | None = None,
        latents_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        if image_key is None and codes_key is None and latents_key is None:
            raise ValueError("ImageTextDataModule needs image_key, codes_key, latents_key or a combination")
        self.resolution = resolution
        self.image_key, self.caption_key, self.meta_key, self.codes_key = image_key, caption_key, meta_key, codes_key
        self.latents_key = latents_key
        super().__init__(**kwargs)

    def fields(self) -> list[Field]:
        fields = [Field("caption", self.caption_key, "text"), _meta(self.meta_key)]
        if self.image_key is not None:
            fields.insert(0, Field("image", self.image_key, "image"))
        if self.codes_key is not None:
            fields.append(Field("codes", self.codes_key, "codes"))
        if self.latents_key is not None:
            fields.append(Field("latents", self.latents_key, "latents"))
        return fields


class VQADataModule(ShardDataModule):
    """Image + question + answer (VQA, caption requests) or image + conversation.
    Batch: image, question, answer, meta, __key__, [conversation].

    Args:
        resolution: image size as in `ImageTextDataModule`.
        image_key, question_key, answer_key, meta_key: member names in the shards; set the question
            and answer keys to ``None`` for conversation-only data.
        conversation_key: JSON list of ``{"role": "user"|"assistant"|"system", "content": str}`` turns
            (e.g. ``conversation.json``); ``None`` (default) reads no conversation.
        **kwargs: the shard, batching and seeding arguments of `ShardDataModule`.
    """

    task = "vqa"

    def __init__(
        self,
        resolution: int = 64,
        image_key: str = "png",
        question_key: str | None = "question.txt",
        answer_key: str | None = "answer.txt",
        meta_key: str | None = "json",
        conversation_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        if (question_key is None) != (answer_key is None):
            raise ValueError("VQADataModule: set both question_key and answer_key, or neither")
        if question_key is None and conversation_key is None:
            raise ValueError("VQADataModule needs question_key/answer_key, conversation_key or both")
        self.resolution = resolution
        self.image_key, self.question_key, self.answer_key = image_key, question_key, answer_key
        self.meta_key, self.conversation_key = meta_key, conversation_key
        super().__init__(**kwargs)

    def fields(self) -> list[Field]:
        fields = [Field("image", self.image_key, "image"), _meta(self.meta_key)]
        if self.question_key is not None:
            fields += [Field("question", self.question_key, "text"), Field("answer", self.answer_key, "text")]
        if self.conversation_key is not None:
            fields.append(Field("conversation", self.conversation_key, "conversation"))
        return fields


class EditDataModule(ShardDataModule):
    """Source image + instruction + target image. Batch: source_image, target_image, instruction, meta,
    __key__, [source_codes, target_codes].

    ``source_image`` is a list of ``3 x H x W`` tensors in [-1, 1] at the stored size, not resized: the model
    prepares it with the sampler's function (``StackedARModule.edit_sources``: the reference's bilinear stretch
    to the VQ resolution, the ViT at the image's own aspect ratio), so training and sampling see the same
    source. ``target_image`` is ``B x 3 x resolution x resolution``, the whole target bilinearly stretched like
    the source's VQ view (no crop), so the unchanged parts of a pair line up.

    Args:
        resolution: side of the (stretched) target images.
        source_key, target_key, instruction_key, meta_key: member names in the shards.
        source_codes_key, target_codes_key: pre-tokenized grids (``source.codes.npy`` / ``target.codes.npy``).
        **kwargs: the shard, batching and seeding arguments of `ShardDataModule`.
    """

    task = "edit"

    def __init__(
        self,
        resolution: int = 64,
        source_key: str = "source.png",
        target_key: str = "target.png",
        instruction_key: str = "txt",
        meta_key: str | None = "json",
        source_codes_key: str | None = None,
        target_codes_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.resolution = resolution
        self.source_key, self.target_key, self.instruction_key = source_key, target_key, instruction_key
        self.meta_key, self.source_codes_key, self.target_codes_key = meta_key, source_codes_key, target_codes_key
        super().__init__(**kwargs)

    def fields(self) -> list[Field]:
        fields = [
            Field("source_image", self.source_key, "stored_image"),
            Field("target_image", self.target_key, "stretched_image"),
            Field("instruction", self.instruction_key, "text"),
            _meta(self.meta_key),
        ]
        if self.source_codes_key is not None:
            fields.append(Field("source_codes", self.source_codes_key, "codes"))
        if self.target_codes_key is not None:
            fields.append(Field("target_codes", self.target_codes_key, "codes"))
        return fields


class KnowledgeDataModule(ShardDataModule):
    """Text-only riddle prompt + plain-caption answer (implicit reasoning). Batch: prompt, answer, meta, __key__.

    Args:
        prompt_key, answer_key, meta_key: member names in the shards.
        **kwargs: the shard, batching and seeding arguments of `ShardDataModule`.
    """

    task = "knowledge"

    def __init__(
        self,
        prompt_key: str = "txt",
        answer_key: str = "answer.txt",
        meta_key: str | None = "json",
        **kwargs: Any,
    ) -> None:
        self.prompt_key, self.answer_key, self.meta_key = prompt_key, answer_key, meta_key
        super().__init__(**kwargs)

    def fields(self) -> list[Field]:
        return [
            Field("prompt", self.prompt_key, "text"),
            Field("answer", self.answer_key, "text"),
            _meta(self.meta_key),
        ]


class MixtureDataModule(ResumableTrainStream, pl.LightningDataModule):
    """Weighted mixture of the DataModules above for multi-task stages: each training batch comes whole
    from one component, drawn with probability proportional to its weight, and ``batch["task"]`` names it.

    Args:
        components: name -> DataModule (each keeps its own shards, batch size and workers).
        weights: name -> relative weight (need not sum to 1).
        batches_per_epoch: training batches per epoch; components that run out restart (next epoch).
        seed: fixes the sequence of draws (the same on every rank, so all ranks run the same task per step).
        max_skip_fraction: skipped/seen ratio past which `DataHealthMonitor` stops the run.

    Validation / test run every component that has val / test shards, one dataloader each.
    YAML::

        data:
          class_path: lit_star.data.MixtureDataModule
          init_args:
            weights: {t2i: 0.8, edit: 0.2}
            components:
              t2i: {class_path: lit_star.data.ImageTextDataModule, init_args: {train_shards: DIR/t2i/train-*.tar}}
              edit: {class_path: lit_star.data.EditDataModule, init_args: {train_shards: DIR/edit/train-*.tar}}
    """

    def __init__(
        self,
        components: dict[str, ShardDataModule],
        weights: dict[str, float],
        batches_per_epoch: int = 1000,
        seed: int = 0,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__()
        if not components:
            raise ValueError("MixtureDataModule needs at least one component")
        if set(components) != set(weights):
            raise ValueError(f"weights {sorted(weights)} must name exactly the components {sorted(components)}")
        self.components = dict(components)
        self.weights = dict(weights)
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.max_skip_fraction = max_skip_fraction

    def setup(self, stage: str | None = None) -> None:
        for component in self.components.values():
            component.setup(stage)

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def train_dataloader(self) -> WeightedBatchMixture:
        return self._resumed(WeightedBatchMixture(
            {name: component.train_dataloader() for name, component in self.components.items()},
            self.weights,
            batches_per_epoch=self.batches_per_epoch,
            seed=self.seed,
            epoch_fn=self._trainer_epoch,
        ))

    def _per_component(self, split: str) -> list[ShardLoader]:
        loaders = (self.components[name].loader(split) for name in sorted(self.components))
        return [loader for loader in loaders if loader is not None]

    def val_dataloader(self) -> list[ShardLoader]:
        return self._per_component("val")

    def test_dataloader(self) -> list[ShardLoader]:
        return self._per_component("test")
