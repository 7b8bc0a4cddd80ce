"""Exact resume of the data stream (in process) and checkpoint hygiene.

The kill -9 tests of every stage are in tests/test_resume_kill.py.
"""

from __future__ import annotations

import itertools

import pytest

from lit_star.data.webdataset_io import STREAM_POSITION_KEY, SampleDecoder
from test_data_layer import (
    image_text_module,
    image_text_sample,
    mixture,
    write_image_text_shards,
    write_shard,
)


def stream_of(loader, batches: int | None = None) -> list[tuple]:
    """(keys, seen, skipped, position) of each batch: what a resumed stream must reproduce."""
    return [
        (tuple(batch["__key__"]), batch["data_health"]["seen"], batch["data_health"]["skipped"],
         batch[STREAM_POSITION_KEY])
        for batch in itertools.islice(loader, batches)
    ]


def shards_with_bad_samples(tmp_path) -> str:
    for shard in range(3):
        samples = [image_text_sample(10 * shard + i) for i in range(7)]
        samples[2]["png"] = b"not a png"  # a skip in every shard, so positions are not batches x batch size
        write_shard(tmp_path / f"train-{shard}.tar", samples)
    return str(tmp_path / "train-*.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batches_per_epoch", [None, 5], ids=["one pass", "fixed length"])
def test_a_resumed_loader_continues_with_the_batch_the_run_would_have_read_next(
        tmp_path, num_workers, batches_per_epoch):
    shards = shards_with_bad_samples(tmp_path)

    def loader():
        return image_text_module(shards, batch_size=2, num_workers=num_workers, shuffle_buffer=4,
                                 batches_per_epoch=batches_per_epoch).train_dataloader()

    uninterrupted = loader()
    epoch0, epoch1 = stream_of(uninterrupted), stream_of(uninterrupted)
    assert len(epoch0) >= 5 and [b[0] for b in epoch0] != [b[0] for b in epoch1]

    for trained in (1, 4):  # with 2 workers: after worker 0's batch, and after worker 1's
        resumed = loader()
        resumed.resume_from(epoch0[trained - 1][3], epoch_finished=False)
        assert stream_of(resumed) == epoch0[trained:], f"the rest of the epoch interrupted after batch {trained}"
        assert stream_of(resumed) == epoch1, "then the next epoch, as if never interrupted"

    at_boundary = loader()
    at_boundary.resume_from(epoch0[-1][3], epoch_finished=True)
    assert stream_of(at_boundary) == epoch1, "a run stopped after an epoch's last batch resumes with the next epoch"


def test_a_resumed_loader_skips_without_decoding(tmp_path):
    shards = write_image_text_shards(tmp_path, n_shards=2, per_shard=10)
    module = image_text_module(shards, batch_size=2, shuffle_buffer=4)
    decoded = []

    class CountingDecoder(SampleDecoder):
        def __call__(self, raw):
            decoded.append(raw["__key__"])
            return super().__call__(raw)

    module.decoder = CountingDecoder(module.decoder.fields, module.decoder.resolution)
    position = stream_of(module.train_dataloader(), 6)[-1][3]
    decoded.clear()
    resumed = module.train_dataloader()
    resumed.resume_from(position, epoch_finished=False)
    assert len(stream_of(resumed)) == 4
    assert len(decoded) == 8, "only the 8 samples after the position may be decoded"


def test_a_resumed_mixture_continues_its_draws_and_every_component(tmp_path):
    # 3 knowledge samples in batches of 2: that component restarts (its next pass) every 2 draws.
    def draws(loader, n=None):
        return [(batch["task"], tuple(batch["__key__"])) for batch in itertools.islice(loader, n)]

    uninterrupted = mixture(tmp_path, seed=0, batches=12).train_dataloader()
    batches = list(uninterrupted)
    expected = draws(batches) + draws(uninterrupted)
    for trained in (1, 7, 12):
        resumed = mixture(tmp_path, seed=0, batches=12).train_dataloader()
        resumed.resume_from(batches[trained - 1][STREAM_POSITION_KEY], epoch_finished=trained == 12)
        rest = draws(resumed) + (draws(resumed) if trained < 12 else [])  # a mid-epoch resume ends its epoch first
        assert rest == expected[trained:], f"resumed after draw {trained}"


def test_resume_with_another_worker_count_is_an_error(tmp_path):
    shards = write_image_text_shards(tmp_path, n_shards=2, per_shard=4)
    position = stream_of(image_text_module(shards, batch_size=2).train_dataloader(), 1)[0][3]
    loader = image_text_module(shards, batch_size=2, num_workers=2).train_dataloader()
    with pytest.raises(ValueError, match="num_workers=2"):
        loader.resume_from(position, epoch_finished=False)
