"""Streaming webdataset shards into collated batches, with every unusable sample skipped and counted.

The pipeline one loader worker runs (`ShardStream`):

    shard list --(shuffle per epoch)--> split by rank --> split_by_worker --> tar members grouped by key
      --(shuffle buffer)--> decode fields (image / text / json / codes) --> batches + "data_health"

Shards are read with our own tar loop instead of webdataset's `tarfile_to_samples` because Python's
streaming tar reader ends quietly at a truncated or corrupt header: a shard cut short would simply
lose its tail. Here that case, a truncated member, an unopenable shard, a corrupt image, an empty
text, bad JSON or codes and a missing key all become one `SkipLedger` entry naming shard, key and
reason, which rides on the next batch (see lit_star/data/health.py).

Exact resume: every batch carries its stream position under ``batch["stream_position"]``: the shuffle
epoch, and for each loader worker how many samples it has taken from its shuffled raw stream and
whether it has emitted its last batch. A loader told to resume from the position of the last batch a
run trained on (`ShardLoader.resume_from`, driven by ``lit_star.resume.ExactResume``) replays the same
shard order and shuffle buffer but drops those raw samples undecoded, so the next batch is the one
the run would have read next, in every worker.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import itertools
import json
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from lit_star.data.health import DATA_HEALTH_KEY, DataHealthError, SkipLedger, combine_reports
from lit_star.data.images import load_image_tensor, load_stored_image_tensor, load_stretched_image_tensor


def reproducible_tar_writer(target) -> wds.TarWriter:
    """A shard writer (``target``: a path or a binary stream) whose members carry no time and no machine
    owner, so that the same samples always give the same bytes (``cmp`` can check a rerun)."""
    return wds.TarWriter(str(target) if isinstance(target, os.PathLike) else target, encoder=False, mtime=0,
                         user="lit_star", group="lit_star")


# image: resized and centre-cropped to the resolution; stretched_image: stretched to it (an edit's target);
# stored_image: at its stored size (an edit's source), batched as a list since sizes differ.
FieldKind = Literal["image", "stretched_image", "stored_image", "text", "json", "codes", "latents", "conversation"]
RESIZED_IMAGE_KINDS = ("image", "stretched_image")
CONVERSATION_ROLES = ("system", "user", "assistant")
TASK_KEY = "task"
STREAM_POSITION_KEY = "stream_position"


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``train-{000000..000009}.tar``), ``::`` lists and globs (``train-*.tar``).

    Local patterns must match at least one existing file; URLs webdataset can open (``pipe:``,
    ``http(s)://``, ``gs://``, ...) pass through unchecked.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for pattern in patterns:
        for url in expand_urls(pattern):
            scheme = url.split(":", 1)[0] if ":" in url else ""
            if scheme in wds.gopen_schemes and scheme != "__default__":
                shards.append(url)
                continue
            matches = sorted(glob.glob(url)) if glob.has_magic(url) else ([url] if os.path.isfile(url) else [])
            if not matches:
                raise FileNotFoundError(f"no shard matches {url!r} (from shard spec {pattern!r})")
            shards.extend(matches)
    if not shards:
        raise FileNotFoundError(f"shard spec {spec!r} names no shards")
    return shards


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason recorded in the skip ledger."""


def _recording_tarinfo(header_errors: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers why header reading stopped.

    `TarFile.next()` treats an empty, truncated or garbled header after the first member as the end
    of the archive. Only an all-zero block (`EOFHeaderError`) is a real end-of-archive marker.
    """

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, archive):
            try:
                return super().fromtarfile(archive)
            except tarfile.HeaderError as exc:
                header_errors.append(exc)
                raise

    return RecordingTarInfo


def read_shard(url: str, ledger: SkipLedger) -> Iterator[dict[str, Any]]:
    """Yield raw samples ``{"__key__", "__url__", ext: bytes, ...}`` from one tar shard (plain or gzipped).

    A truncated or unreadable archive ends the shard (a tar stream cannot resynchronise). A member cut
    short makes its sample one skip; an archive that stops between members or inside a header (where
    `tarfile` would simply report a shorter archive) yields what it read and records one skip for the
    lost tail. Either way the loss is counted, never silent.
    """
    try:
        stream = wds.gopen(url)
    except Exception as exc:  # missing file, failing pipe: every opener error means the same here
        ledger.skip(url, "", f"cannot open shard: {exc}")
        return
    try:
        yield from _samples_in_archive(url, stream, ledger)
    finally:
        stream.close()


def _samples_in_archive(url: str, stream: Any, ledger: SkipLedger) -> Iterator[dict[str, Any]]:
    header_errors: list[tarfile.HeaderError] = []
    sample: dict[str, Any] | None = None
    member = ""
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_recording_tarinfo(header_errors))
        for info in archive:
            archive.members = []  # streaming: do not keep every header of a large shard in memory
            member = info.name
            if not info.isreg() or info.name.split("/")[-1].startswith("__"):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield from _complete(sample, ledger)
                sample = {"__key__": key, "__url__": url}
            data = archive.extractfile(info).read()
            ext = ext.lower()
            if ext in sample:
                sample["__bad__"] = f"duplicate member {info.name!r}"
            sample[ext] = data
    except Exception as exc:  # tarfile.ReadError, EOFError / zlib.error from a cut .tar.gz, OSError
        where = f" at member {member!r}" if member else ""
        ledger.skip(url, sample["__key__"] if sample else "", f"unreadable tar{where}: {exc}; rest of shard lost")
        return
    if sample is not None:
        # Its members so far are intact; the decoder rejects it if any field it needs is missing.
        yield from _complete(sample, ledger)
    ending = header_errors[-1] if header_errors else None
    if ending is not None and not isinstance(ending, tarfile.EOFHeaderError):
        after = f" after member {member!r}" if member else ""
        ledger.skip(
            url,
            sample["__key__"] if sample else "",
            f"truncated tar: no end-of-archive marker{after} ({ending}); samples after this key, if any, are lost",
        )


def _complete(sample: dict[str, Any], ledger: SkipLedger) -> Iterator[dict[str, Any]]:
    if "__bad__" in sample:
        ledger.skip(sample["__url__"], sample["__key__"], sample["__bad__"])
    else:
        yield sample


@dataclass(frozen=True)
class Field:
    """One batch entry: ``name`` in the batch, read from sample member ``key`` and decoded as ``kind``.

    ``key`` may list alternatives as webdataset does, ``"jpg;png;webp"`` (the first present wins).
    A json field with ``key=None`` yields ``{}`` so batches keep their "meta" entry for unannotated data.
    """

    name: str
    key: str | None
    kind: FieldKind


class SampleDecoder:
    """Turns a raw sample into decoded fields; raises `SkipSample` with the reason for unusable ones."""

    def __init__(self, fields: Sequence[Field], resolution: int | None = None) -> None:
        if any(field.kind in RESIZED_IMAGE_KINDS for field in fields) and not resolution:
            raise ValueError("image fields need a resolution")
        for field in fields:
            if field.key is None and field.kind != "json":
                raise ValueError(f"field {field.name!r}: only json fields may have key=None")
        self.fields = tuple(fields)
        self.resolution = resolution

    def __call__(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        decoded = {"__key__": raw["__key__"]}
        for field in self.fields:
            decoded[field.name] = self._decode(field, raw)
        return decoded

    def _decode(self, field: Field, raw: Mapping[str, Any]) -> Any:
        if field.key is None:
            return {}
        ext = next((alt for alt in field.key.split(";") if alt in raw), None)
        if ext is None:
            present = ", ".join(sorted(k for k in raw if not k.startswith("__")))
            raise SkipSample(f"missing key {field.key!r} (sample has: {present or 'nothing'})")
        data = raw[ext]
        if field.kind in ("image", "stretched_image", "stored_image"):
            try:
                if field.kind == "stored_image":
                    return load_stored_image_tensor(data)
                if field.kind == "stretched_image":
                    return load_stretched_image_tensor(data, self.resolution)
                return load_image_tensor(data, self.resolution)
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                raise SkipSample(f"corrupt image {ext!r}: {type(exc).__name__}: {exc}") from None
        if field.kind == "text":
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SkipSample(f"{ext!r} is not utf-8: {exc}") from None
            if not text.strip():
                raise SkipSample(f"empty {ext!r}")
            return text
        if field.kind in ("json", "conversation"):
            try:
                value = json.loads(data)
            except ValueError as exc:
                raise SkipSample(f"invalid json {ext!r}: {exc}") from None
            return _check_conversation(ext, value) if field.kind == "conversation" else value
        if field.kind == "latents":
            return _decode_latents(ext, data)
        return _decode_codes(ext, data)


def _check_conversation(ext: str, turns: Any) -> list[dict[str, str]]:
    """A chat as a list of ``{"role": system|user|assistant, "content": non-empty text}`` turns."""
    if not isinstance(turns, list) or not turns:
        raise SkipSample(f"{ext!r} must be a non-empty list of turns")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in CONVERSATION_ROLES:
            raise SkipSample(f"{ext!r} turn {index} needs a role in {CONVERSATION_ROLES}")
        if not isinstance(turn.get("content"), str) or not turn["content"].strip():
            raise SkipSample(f"{ext!r} turn {index} has empty content")
    if not any(turn["role"] == "assistant" for turn in turns):
        raise SkipSample(f"{ext!r} has no assistant turn to learn from")
    return turns


def _decode_codes(ext: str, data: bytes) -> torch.Tensor:
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError / OSError / EOFError for malformed .npy
        raise SkipSample(f"unreadable {ext!r}: {exc}") from None
    if codes.dtype.kind not in "iu" or codes.ndim != 2:
        raise SkipSample(f"{ext!r} must be a 2-D integer array of code ids, got {codes.dtype} {codes.shape}")
    return torch.from_numpy(codes.astype(np.int64))


def _decode_latents(ext: str, data: bytes) -> torch.Tensor:
    """A pre-extracted VAE posterior (``tokenize --vae``): C2 x h x w float (mean and log-variance stacked)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise SkipSample(f"unreadable {ext!r}: {exc}") from None
    if array.dtype.kind != "f" or array.ndim != 3:
        raise SkipSample(f"{ext!r} must be a 3-D float array (channels x h x w), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.float32))


def collate(samples: Sequence[Mapping[str, Any]], fields: Sequence[Field]) -> dict[str, Any]:
    """Stack image and codes fields into tensors; keep texts, metadata and stored-size images as lists."""
    batch: dict[str, Any] = {"__key__": [sample["__key__"] for sample in samples]}
    for field in fields:
        values = [sample[field.name] for sample in samples]
        if field.kind in (*RESIZED_IMAGE_KINDS, "codes", "latents"):
            shapes = {tuple(value.shape) for value in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"{field.name!r} ({field.key}) has different shapes {sorted(shapes)} within one batch "
                    f"(keys {batch['__key__']}); every shard set must use one resolution / tokenizer grid"
                )
            batch[field.name] = torch.stack(values)
        else:
            batch[field.name] = values
    return batch


class CountedSamples:
    """An iterator that counts how many samples it has handed out (a worker's raw stream position)."""

    def __init__(self, samples: Iterator[dict[str, Any]]) -> None:
        self.samples = samples
        self.count = 0

    def __iter__(self) -> CountedSamples:
        return self

    def __next__(self) -> dict[str, Any]:
        sample = next(self.samples)
        self.count += 1
        return sample


class ShardStream(IterableDataset):
    """Batches from webdataset shards, split by node and worker, deterministic given `seed` and epoch.

    Args:
        shards: shard paths / URLs (already expanded, see `expand_shards`).
        decoder: how each sample becomes batch fields.
        batch_size: samples per batch.
        seed: every shuffle derives from (seed, epoch, rank, worker), never from global RNG state.
        shuffle_shards: shuffle the shard order each epoch (identically on every rank and worker).
        shuffle_buffer: samples held for in-worker shuffling; 0 keeps shard order.
        batches_per_epoch: if set, every rank yields exactly this many batches per epoch, cycling
            over its shards as needed (equal step counts keep DDP ranks in lock-step); if None one
            epoch is one pass over the shards.
        drop_last: drop each worker's final partial batch.
        allow_idle_ranks: with fewer shards than ranks, let the ranks without a shard yield nothing
            (fine for evaluation); otherwise that is an error, as unequal training steps hang DDP.
        task: stored under ``batch["task"]`` so multi-task modules know what they got.
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: SampleDecoder,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        drop_last: bool = False,
        allow_idle_ranks: bool = False,
        task: str = "",
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        self.shards = list(shards)
        self.decoder = decoder
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.drop_last = drop_last
        self.allow_idle_ranks = allow_idle_ranks
        self.task = task
        self.epoch = 0
        self.node: tuple[int, int] | None = None
        self.resume_positions: Mapping[int, Mapping[str, Any]] = {}
        self.worker_rotation = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_node(self, rank: int, world_size: int) -> None:
        """Fix the rank this stream reads for, as seen by the main process (see `_node`)."""
        self.node = (rank, world_size)

    def set_resume(self, positions: Mapping[int, Mapping[str, Any]], worker_rotation: int) -> None:
        """Start the next pass at ``positions`` ({worker: {"consumed", "batches", "finished"}}, one per
        worker that had emitted a batch), with loader worker ``w`` reading as worker ``w + worker_rotation``.

        A multi-worker DataLoader takes batches from its workers in turn, starting with worker 0; the
        rotation makes the worker after the one that produced the last trained batch come first again.
        """
        self.resume_positions = dict(positions)
        self.worker_rotation = worker_rotation

    def _node(self) -> tuple[int, int]:
        # Loader workers started with spawn / forkserver have no process group, so webdataset's
        # split_by_node would see world size 1 there and every rank would read every shard.
        # `ShardLoader` records the main process's rank before the workers start.
        if self.node is not None:
            return self.node
        rank, world_size, _, _ = pytorch_worker_info()
        return rank, world_size

    def _worker(self) -> tuple[int, int]:
        """(the worker this process reads as, number of workers)."""
        _, _, worker, num_workers = pytorch_worker_info()
        return (worker + self.worker_rotation) % num_workers, num_workers

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a single pass over shards has no known length; set batches_per_epoch")
        return self.batches_per_epoch

    def _shards_of_this_worker(self, pass_index: int) -> tuple[list[str], int]:
        """This worker's shards for one pass, and how many shards this rank has in total."""
        shard_seed = f"{self.seed}/shards/{self.epoch}/{pass_index}" if self.shuffle_shards else None
        ordered = [entry["url"] for entry in wds.SimpleShardList(self.shards, seed=shard_seed)]
        rank, world_size = self._node()
        rank_shards = ordered[rank::world_size]
        if not rank_shards and not self.allow_idle_ranks:
            raise ValueError(
                f"rank {rank} of {world_size} got no shard: {len(self.shards)} shards cannot be split across "
                f"{world_size} ranks; write more, smaller shards"
            )
        # Empty for workers beyond the shard count (webdataset's empty_check=False behaviour): they yield nothing.
        worker, num_workers = self._worker()
        return rank_shards[worker::num_workers], len(rank_shards)

    def _worker_quota(self, rank_shard_count: int) -> int | None:
        """Batches this worker yields when the epoch length is fixed; workers without shards get none."""
        if self.batches_per_epoch is None:
            return None
        worker, num_workers = self._worker()
        active = min(num_workers, rank_shard_count)
        if worker >= active:
            return 0
        share, remainder = divmod(self.batches_per_epoch, active)
        return share + (1 if worker < remainder else 0)

    def _raw_samples(self, ledger: SkipLedger, first_pass: list[str]) -> Iterator[dict[str, Any]]:
        pass_shards = first_pass
        for pass_index in itertools.count():
            if pass_index > 0:
                pass_shards, _ = self._shards_of_this_worker(pass_index)
            produced = 0
            for url in pass_shards:
                for sample in read_shard(url, ledger):
                    produced += 1
                    yield sample
            if self.batches_per_epoch is None:
                return
            if produced == 0:
                raise DataHealthError(
                    f"no readable sample in shards {pass_shards}; most recent skips: {list(ledger.recent)}"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _ = self._node()
        worker, _ = self._worker()
        resumed = self.resume_positions.get(worker)
        if resumed is not None and resumed["finished"]:
            return
        ledger = SkipLedger()
        shards, rank_shard_count = self._shards_of_this_worker(0)
        quota = self._worker_quota(rank_shard_count)
        if not shards or quota == 0:
            return
        samples: Iterator[dict[str, Any]] = self._raw_samples(ledger, shards)
        if self.shuffle_buffer > 0:
            rng = random.Random(f"{self.seed}/samples/{self.epoch}/{rank}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        counted = CountedSamples(samples)
        emitted = 0
        if resumed is not None:
            # The same shard order and shuffle buffer, but the samples already trained on are dropped
            # undecoded; their skips were counted when the interrupted run read them.
            collections.deque(itertools.islice(counted, resumed["consumed"]), maxlen=0)
            ledger.drain()
            emitted = resumed["batches"]
            quota = None if quota is None else quota - emitted
        groups = itertools.islice(self._batched(self._decoded(counted, ledger)), quota)
        # One batch of look-ahead: a batch leaves only once the next one is read, so the skips found
        # while reading the tail of the last shard ride on the final batch instead of vanishing. Each
        # batch's counts and position are taken when it is complete, so a resume can start right there.
        held: tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]] | None = None
        for group in groups:
            emitted += 1
            complete = (group, ledger.drain(), self._position(worker, counted.count, emitted))
            if held is not None:
                yield self._finish(*held)
            held = complete
        if held is not None:
            group, report, position = held
            position["finished"] = True
            yield self._finish(group, combine_reports(report, ledger.drain()), position)
        elif ledger.skipped and ledger.skipped == ledger.seen:
            raise DataHealthError(
                f"worker {worker} of rank {rank} read {ledger.seen} samples from {shards} and could use none; "
                f"most recent skips: {list(ledger.recent)}"
            )

    @staticmethod
    def _position(worker: int, consumed: int, batches: int) -> dict[str, Any]:
        return {"worker": worker, "consumed": consumed, "batches": batches, "finished": False}

    def _decoded(self, samples: Iterator[dict[str, Any]], ledger: SkipLedger) -> Iterator[dict[str, Any]]:
        for raw in samples:
            try:
                decoded = self.decoder(raw)
            except SkipSample as skip:
                ledger.skip(raw["__url__"], raw["__key__"], str(skip))
                continue
            ledger.count_seen()
            yield decoded

    def _batched(self, samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        while group := list(itertools.islice(samples, self.batch_size)):
            if len(group) < self.batch_size and self.drop_last:
                return
            yield group

    def _finish(self, group: list[dict[str, Any]], health: dict[str, Any], position: dict[str, Any]) -> dict[str, Any]:
        batch = collate(group, self.decoder.fields)
        batch[TASK_KEY] = self.task
        batch[DATA_HEALTH_KEY] = health
        batch[STREAM_POSITION_KEY] = position
        return batch


def _current_epoch(epoch_fn: Callable[[], int | None] | None, iterations: int) -> int:
    """The trainer's epoch when there is one, else how many times the loader was iterated before."""
    epoch = epoch_fn() if epoch_fn is not None else None
    return iterations if epoch is None else epoch


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on ``parts`` alone (not on Python's per-process hash salt)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ShardLoader(DataLoader):
    """DataLoader over a `ShardStream` (batching happens in the workers) that sets epoch and rank on every pass.

    ``epoch_fn`` supplies the epoch (the trainer's, so a resumed run continues the shuffle sequence);
    without it each new iteration counts as the next epoch. Workers are not persistent so each
    epoch's workers get the stream with its new epoch; their seeds depend on (seed, epoch) alone.

    Every batch leaves with the loader's whole position under ``batch["stream_position"]``:
    ``{"epoch", "iterations", "num_workers", "last_worker", "workers": {worker: {"consumed", "batches",
    "finished"}}}``. `resume_from` takes the position of the last batch trained on.
    """

    def __init__(
        self,
        dataset: ShardStream,
        *,
        num_workers: int = 0,
        seed: int = 0,
        epoch_fn: Callable[[], int | None] | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator(),  # reseeded per epoch in __iter__: deterministic worker base seeds
        )
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.iterations = 0
        self._resume: dict[str, Any] | None = None

    @property
    def worker_count(self) -> int:
        """Workers that read shards (the main process counts as one when num_workers is 0)."""
        return max(self.num_workers, 1)

    def resume_from(self, position: Mapping[str, Any], epoch_finished: bool) -> None:
        """Make the next pass continue after the batch whose ``stream_position`` is ``position``.

        ``epoch_finished``: that batch was the last of its epoch, so the next pass is the next epoch's
        first (the trainer's epoch is not advanced yet when Lightning first iterates a resumed loader).
        """
        if position["num_workers"] != self.worker_count:
            raise ValueError(
                f"the checkpoint's data stream was read by {position['num_workers']} loader worker(s), this "
                f"run has num_workers={self.num_workers}; exact resume needs the same data num_workers"
            )
        if epoch_finished:
            self.iterations = position["iterations"]
            self._resume = {"epoch": position["epoch"] + 1, "workers": {}, "rotation": 0}
        else:
            self.iterations = position["iterations"] - 1
            self._resume = {
                "epoch": position["epoch"],
                "workers": position["workers"],
                "rotation": (position["last_worker"] + 1) % self.worker_count,
            }

    def __iter__(self):
        rank, world_size, _, _ = pytorch_worker_info()
        self.dataset.set_node(rank, world_size)
        resume, self._resume = self._resume, None
        epoch = resume["epoch"] if resume else _current_epoch(self.epoch_fn, self.iterations)
        self.iterations += 1
        self.dataset.set_epoch(epoch)
        self.dataset.set_resume(resume["workers"] if resume else {}, resume["rotation"] if resume else 0)
        self.generator.manual_seed(derived_seed(self.seed, "workers", epoch))
        return self._positioned(super().__iter__(), epoch, resume["workers"] if resume else {})

    def _positioned(self, batches: Iterator[dict[str, Any]], epoch: int,
                    workers: Mapping[int, Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        workers = {worker: dict(position) for worker, position in workers.items()}
        iterations = self.iterations
        for batch in batches:
            position = dict(batch[STREAM_POSITION_KEY])
            worker = position.pop("worker")
            workers[worker] = position
            batch[STREAM_POSITION_KEY] = {
                "epoch": epoch,
                "iterations": iterations,
                "num_workers": self.worker_count,
                "last_worker": worker,
                "workers": {w: dict(p) for w, p in workers.items()},
            }
            yield batch


class WeightedBatchMixture:
    """Draws each batch from one of several loaders with fixed probabilities, for multi-task stages.

    The draw sequence depends only on (seed, epoch), so every rank trains the same task at each step.
    A loader that runs out is restarted (its next epoch); the mixture's epoch is `batches_per_epoch`.
    Each batch's ``stream_position`` is the mixture's: ``{"epoch", "iterations", "draws", "components":
    {name: {"iterations", "position"}}}``, with the position of each component read in this epoch.
    """

    def __init__(
        self,
        loaders: Mapping[str, ShardLoader],
        weights: Mapping[str, float],
        *,
        batches_per_epoch: int,
        seed: int = 0,
        epoch_fn: Callable[[], int | None] | None = None,
    ) -> None:
        if set(loaders) != set(weights):
            raise ValueError(f"mixture weights {sorted(weights)} must name exactly the components {sorted(loaders)}")
        if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {dict(weights)}")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.names = sorted(loaders)
        self.loaders = dict(loaders)
        self.weights = [float(weights[name]) for name in self.names]
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.iterations = 0
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def resume_from(self, position: Mapping[str, Any], epoch_finished: bool) -> None:
        """Make the next pass continue after the batch whose ``stream_position`` is ``position``
        (``epoch_finished`` as in `ShardLoader.resume_from`)."""
        if set(position["components"]) != set(self.names):
            raise ValueError(
                f"the checkpoint's data mixture has components {sorted(position['components'])}, this run has "
                f"{self.names}; exact resume needs the same components"
            )
        live = {}
        for name, component in position["components"].items():
            loader = self.loaders[name]
            if epoch_finished or component["position"] is None:
                loader.iterations = component["iterations"]  # its next pass starts afresh, as it would have
            else:
                loader.resume_from(component["position"], epoch_finished=False)
                live[name] = component["position"]
        if epoch_finished:
            self.iterations = position["iterations"]
            self._resume = {"epoch": position["epoch"] + 1, "draws": 0, "live": {}}
        else:
            self.iterations = position["iterations"] - 1
            self._resume = {"epoch": position["epoch"], "draws": position["draws"], "live": live}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resume, self._resume = self._resume, None
        epoch = resume["epoch"] if resume else _current_epoch(self.epoch_fn, self.iterations)
        self.iterations += 1
        rng = random.Random(f"{self.seed}/mixture/{epoch}")
        draws = rng.choices(self.names, weights=self.weights, k=self.batches_per_epoch)
        # Components read in this epoch before the interruption continue where they were.
        positions: dict[str, Any] = dict(resume["live"]) if resume else {}
        iterators: dict[str, Iterator[dict[str, Any]]] = {name: iter(self.loaders[name]) for name in positions}
        for index in range(resume["draws"] if resume else 0, self.batches_per_epoch):
            name = draws[index]
            batch = self._next_batch(name, iterators)
            positions[name] = batch[STREAM_POSITION_KEY]
            batch[STREAM_POSITION_KEY] = {
                "epoch": epoch,
                "iterations": self.iterations,
                "draws": index + 1,
                "components": {
                    component: {"iterations": self.loaders[component].iterations,
                                "position": positions.get(component)}
                    for component in self.names
                },
            }
            yield batch

    def _next_batch(self, name: str, iterators: dict[str, Iterator[dict[str, Any]]]) -> dict[str, Any]:
        for _ in range(2):  # a finished loader gets one restart
            if name not in iterators:
                iterators[name] = iter(self.loaders[name])
            try:
                batch = next(iterators[name])
            except StopIteration:
                del iterators[name]
                continue
            batch[TASK_KEY] = name
            return batch
        raise DataHealthError(f"mixture component {name!r} produced no batch in a whole pass over its shards")
