"""Shared data layer: image decoding, skip accounting, determinism, worker splits, mixtures, codes.

    OMP_NUM_THREADS=1 python -m pytest tests/test_data_layer.py -q

Every test writes its own tiny webdataset shards (some deliberately broken) into a tmp dir.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import jsonargparse
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lit_star.data import (
    DataHealthError,
    DataHealthMonitor,
    EditDataModule,
    ImageTextDataModule,
    KnowledgeDataModule,
    MixtureDataModule,
    VQADataModule,
    strip_data_health,
)
from lit_star.data.images import load_image_tensor
from lit_star.data.webdataset_io import expand_shards

RES = 8


def png_bytes(color=(255, 0, 0), size=(RES, RES), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_text_sample(index: int, **overrides) -> dict:
    sample = {
        "__key__": f"{index:06d}",
        "png": png_bytes((index * 7 % 256, 0, 0)),
        "txt": f"caption {index}".encode(),
        "json": json.dumps({"index": index}).encode(),
    }
    sample.update(overrides)
    return {name: value for name, value in sample.items() if value is not None}


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def write_image_text_shards(root: Path, n_shards: int, per_shard: int, prefix: str = "train") -> str:
    for shard in range(n_shards):
        samples = [image_text_sample(shard * per_shard + i) for i in range(per_shard)]
        write_shard(root / f"{prefix}-{shard:06d}.tar", samples)
    return str(root / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def all_batches(loader) -> list[dict]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["__key__"]]


def skip_reasons(batches) -> list[str]:
    return [reason for batch in batches for reason in batch["data_health"]["recent_skips"]]


def total_health(batches) -> tuple[int, int]:
    return (
        sum(batch["data_health"]["seen"] for batch in batches),
        sum(batch["data_health"]["skipped"] for batch in batches),
    )


def image_text_module(shards: str, **kwargs) -> ImageTextDataModule:
    kwargs.setdefault("resolution", RES)
    module = ImageTextDataModule(train_shards=shards, **kwargs)
    module.setup("fit")
    return module


# ---------------------------------------------------------------- images


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (RES, RES), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    if transparent:
        image.info["transparency"] = 1
    return image


@pytest.mark.parametrize(
    ("name", "data", "expected_rgb"),
    [
        ("1", encode(Image.new("1", (RES, RES), 1), "PNG"), (255, 255, 255)),
        ("L", encode(Image.new("L", (RES, RES), 0), "PNG"), (0, 0, 0)),
        ("LA transparent", encode(Image.new("LA", (RES, RES), (0, 0)), "PNG"), (255, 255, 255)),
        ("RGBA transparent", encode(Image.new("RGBA", (RES, RES), (0, 0, 255, 0)), "PNG"), (255, 255, 255)),
        ("RGBA opaque", encode(Image.new("RGBA", (RES, RES), (0, 0, 255, 255)), "PNG"), (0, 0, 255)),
        ("P", encode(palette_image(False), "PNG"), (255, 0, 0)),
        ("P transparent", encode(palette_image(True), "PNG"), (255, 255, 255)),
        ("CMYK", encode(Image.new("CMYK", (RES, RES), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
        ("I;16 max", encode(Image.new("I;16", (RES, RES), 65535), "PNG"), (255, 255, 255)),
        ("I;16 zero", encode(Image.new("I;16", (RES, RES), 0), "PNG"), (0, 0, 0)),
        ("JPEG", encode(Image.new("RGB", (RES, RES), (0, 255, 0)), "JPEG"), (0, 255, 0)),
    ],
)
def test_every_image_mode_decodes_to_rgb_in_minus_one_one(name, data, expected_rgb):
    tensor = load_image_tensor(data, RES)
    assert tensor.shape == (3, RES, RES) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    expected = torch.tensor(expected_rgb, dtype=torch.float32) / 127.5 - 1.0
    assert torch.allclose(tensor.mean(dim=(1, 2)), expected, atol=0.05), name


def test_shorter_side_resized_and_centre_cropped():
    wide = Image.new("RGB", (64, 16), (0, 0, 255))
    wide.paste((255, 0, 0), (16, 0, 48, 16))  # red centre half, blue outer quarters
    tensor = load_image_tensor(encode(wide, "PNG"), RES)
    assert tensor.shape == (3, RES, RES)
    red = torch.tensor([1.0, -1.0, -1.0])
    assert torch.allclose(tensor.mean(dim=(1, 2)), red, atol=0.02)


# ---------------------------------------------------------------- skipping and counting


def test_corrupt_image_empty_caption_missing_key_are_skipped_and_counted(tmp_path):
    samples = [image_text_sample(i) for i in range(10)]
    samples[2]["png"] = b"\x89PNG\r\n\x1a\n not really a png"
    samples[4]["png"] = png_bytes()[:40]  # truncated image data
    samples[5]["txt"] = b"  \n"
    del samples[7]["txt"]
    shard = write_shard(tmp_path / "train-000000.tar", samples)
    module = image_text_module(shard, batch_size=3, shuffle_buffer=0)
    batches = all_batches(module.train_dataloader())

    assert keys_of(batches) == [f"{i:06d}" for i in (0, 1, 3, 6, 8, 9)]
    assert total_health(batches) == (10, 4)
    reasons = skip_reasons(batches)
    assert len(reasons) == 4
    assert all(shard in reason for reason in reasons)
    assert "key=000002" in reasons[0] and "corrupt image 'png'" in reasons[0]
    assert "key=000004" in reasons[1] and "corrupt image" in reasons[1]
    assert "key=000005" in reasons[2] and "empty 'txt'" in reasons[2]
    assert "key=000007" in reasons[3] and "missing key 'txt'" in reasons[3]
    for batch in batches:
        health = batch["data_health"]
        assert health["last_skip"] == (health["recent_skips"][-1] if health["skipped"] else "")


def member_offsets(path: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return {info.name: info for info in archive.getmembers()}


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_tar_truncated_inside_a_member_counts_the_broken_sample(tmp_path):
    shard = write_shard(tmp_path / "cut.tar", [image_text_sample(i) for i in range(6)])
    png_of_3 = member_offsets(shard)["000003.png"]
    truncate(shard, png_of_3.offset_data + png_of_3.size // 2)
    batches = all_batches(image_text_module(shard, batch_size=2, shuffle_buffer=0).train_dataloader())

    assert keys_of(batches) == ["000000", "000001", "000002"]
    assert total_health(batches) == (4, 1)
    (reason,) = skip_reasons(batches)
    assert shard in reason and "key=000003" in reason and "000003.png" in reason


@pytest.mark.parametrize("extra_bytes", [0, 100], ids=["between members", "inside the next header"])
def test_tar_cut_between_members_is_counted_not_silently_shortened(tmp_path, extra_bytes):
    shard = write_shard(tmp_path / "cut.tar", [image_text_sample(i) for i in range(6)])
    # Plain tarfile / webdataset report such an archive as merely shorter: samples 4 and 5 would vanish.
    last_member_of_3 = member_offsets(shard)["000003.txt"]
    end_of_3 = last_member_of_3.offset_data + (last_member_of_3.size + 511) // 512 * 512
    truncate(shard, end_of_3 + extra_bytes)
    batches = all_batches(image_text_module(shard, batch_size=2, shuffle_buffer=0).train_dataloader())

    assert keys_of(batches) == ["000000", "000001", "000002", "000003"]
    assert total_health(batches) == (5, 1)
    (reason,) = skip_reasons(batches)
    assert shard in reason and "key=000003" in reason and "no end-of-archive marker" in reason


def test_unreadable_shard_is_counted_and_other_shards_still_read(tmp_path):
    write_image_text_shards(tmp_path, n_shards=1, per_shard=4)
    garbage = tmp_path / "train-000001.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    batches = all_batches(image_text_module(str(tmp_path / "train-*.tar"), batch_size=4).train_dataloader())
    assert sorted(keys_of(batches)) == [f"{i:06d}" for i in range(4)]
    assert total_health(batches) == (5, 1)
    (reason,) = skip_reasons(batches)
    assert str(garbage) in reason


def test_a_worker_that_can_use_no_sample_at_all_fails_loudly(tmp_path):
    shard = write_shard(tmp_path / "bad.tar", [image_text_sample(i, png=b"garbage") for i in range(3)])
    with pytest.raises(DataHealthError, match=r"could use none.*key=000002 reason=corrupt image"):
        all_batches(image_text_module(shard, batch_size=2).train_dataloader())


def test_shard_specs_expand_braces_globs_and_urls_and_fail_on_no_match(tmp_path):
    for name in ("a-0.tar", "a-1.tar", "b-0.tar"):
        (tmp_path / name).touch()
    assert expand_shards(f"{tmp_path}/a-{{0..1}}.tar::{tmp_path}/b-*.tar") == [
        f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar", f"{tmp_path}/b-0.tar"
    ]
    assert expand_shards(["pipe:cat x.tar", "https://host/y.tar"]) == ["pipe:cat x.tar", "https://host/y.tar"]
    with pytest.raises(FileNotFoundError, match="missing-"):
        image_text_module(str(tmp_path / "missing-*.tar"))


# ---------------------------------------------------------------- health monitor


def health_batch(seen: int, skipped: int, last_skip: str = "") -> dict:
    recent = [last_skip] if last_skip else []
    return {"data_health": {"seen": seen, "skipped": skipped, "last_skip": last_skip, "recent_skips": recent}}


def test_monitor_raises_past_threshold_naming_shard_and_key():
    monitor = DataHealthMonitor(max_skip_fraction=0.01, min_seen=200)
    monitor.update(health_batch(150, 10, "shard=/d/a.tar key=000001 reason=corrupt image"), 0.01)  # below min_seen
    monitor.update(health_batch(49, 0), 0.01)
    with pytest.raises(DataHealthError, match=r"shard=/d/a\.tar key=000001 reason=corrupt image"):
        monitor.update(health_batch(1, 0), 0.01)


def test_monitor_stays_quiet_at_or_below_threshold():
    monitor = DataHealthMonitor(max_skip_fraction=0.01, min_seen=200)
    for _ in range(10):
        monitor.update(health_batch(100, 1, "shard=/d/a.tar key=x reason=empty 'txt'"), 0.01)
    assert (monitor.seen, monitor.skipped) == (1000, 10)
    assert monitor.skipped_fraction == pytest.approx(0.01)


class CountingModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batch_sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        batch = strip_data_health(batch)
        assert "data_health" not in batch
        self.batch_sizes.append(batch["image"].shape[0])
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: ImageTextDataModule, monitor: DataHealthMonitor) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor], log_every_n_steps=1,
    )
    trainer.fit(CountingModule(), datamodule=module)
    return trainer


def test_monitor_in_a_trainer_logs_counts_and_stops_a_bad_run(tmp_path):
    samples = [image_text_sample(i) for i in range(40)]
    samples[3]["txt"] = b""
    good = write_shard(tmp_path / "good.tar", samples)
    trainer = fit(image_text_module(good, batch_size=8, max_skip_fraction=0.05), DataHealthMonitor(min_seen=10))
    assert trainer.callback_metrics["data/skipped"].item() == 1.0
    assert trainer.callback_metrics["data/skipped_fraction"].item() == pytest.approx(1 / 40)

    for i in range(0, 40, 5):
        samples[i]["png"] = b"broken"
    bad = write_shard(tmp_path / "bad.tar", samples)
    with pytest.raises(DataHealthError, match=rf"shard={bad} key=0000\d\d reason=corrupt image"):
        fit(image_text_module(bad, batch_size=8, max_skip_fraction=0.05), DataHealthMonitor(min_seen=10))


def test_a_short_run_over_bad_data_fails_when_it_ends_naming_the_first_skip_of_each_kind(tmp_path):
    samples = [image_text_sample(i) for i in range(40)]
    samples[1]["png"] = b"broken"
    for i in range(10, 34, 4):
        samples[i]["txt"] = b""
    bad = write_shard(tmp_path / "bad.tar", samples)
    module = image_text_module(bad, batch_size=8, shuffle_buffer=0, max_skip_fraction=0.05)
    with pytest.raises(DataHealthError, match="by the end of the run") as failure:
        fit(module, DataHealthMonitor(min_seen=200))  # 7 of 40 skipped: no verdict during the run
    message = failure.value.args[0]
    first, recent = message.split("Most recent skips:")
    assert "key=000001 reason=corrupt image" in first and "key=000010 reason=empty 'txt'" in first
    assert "000001" not in recent and recent.count("reason=empty") == 5


# ---------------------------------------------------------------- determinism and splitting


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_same_batches_other_seed_other_order(tmp_path, num_workers):
    shards = write_image_text_shards(tmp_path, n_shards=4, per_shard=10)

    def order(seed):
        module = image_text_module(shards, batch_size=4, num_workers=num_workers, seed=seed, shuffle_buffer=8)
        return [tuple(batch["__key__"]) for batch in module.train_dataloader()]

    first = order(seed=1)
    assert first == order(seed=1)
    assert first != order(seed=2)
    assert sorted(key for batch in first for key in batch) == [f"{i:06d}" for i in range(40)]


def test_each_epoch_reshuffles_deterministically(tmp_path):
    shards = write_image_text_shards(tmp_path, n_shards=3, per_shard=8)
    loader = image_text_module(shards, batch_size=4, seed=3, shuffle_buffer=8).train_dataloader()
    epoch0, epoch1 = keys_of(loader), keys_of(loader)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    again = image_text_module(shards, batch_size=4, seed=3, shuffle_buffer=8).train_dataloader()
    assert [keys_of(again), keys_of(again)] == [epoch0, epoch1]


def test_two_workers_and_two_ranks_cover_every_sample_exactly_once(tmp_path, monkeypatch):
    shards = write_image_text_shards(tmp_path, n_shards=5, per_shard=6)
    seen: list[str] = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = image_text_module(shards, batch_size=4, num_workers=2, shuffle_buffer=4).train_dataloader()
        seen += keys_of(loader)
    assert len(seen) == 30 and sorted(seen) == [f"{i:06d}" for i in range(30)]


def test_more_workers_than_shards_is_not_an_error(tmp_path):
    shards = write_image_text_shards(tmp_path, n_shards=1, per_shard=5)
    loader = image_text_module(shards, batch_size=2, num_workers=2).train_dataloader()
    assert sorted(keys_of(loader)) == [f"{i:06d}" for i in range(5)]


def test_fewer_shards_than_ranks_idles_evaluation_but_refuses_training(tmp_path, monkeypatch):
    shards = write_image_text_shards(tmp_path, n_shards=1, per_shard=3)
    module = ImageTextDataModule(train_shards=shards, val_shards=shards, resolution=RES, batch_size=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert all_batches(module.val_dataloader()) == []
    with pytest.raises(ValueError, match="rank 1 of 2 got no shard"):
        all_batches(module.train_dataloader())


def test_batches_per_epoch_gives_every_rank_the_same_step_count(tmp_path, monkeypatch):
    for shard, size in enumerate((3, 9, 2)):  # uneven shards: one pass would give ranks different step counts
        write_shard(tmp_path / f"train-{shard}.tar", [image_text_sample(100 * shard + i) for i in range(size)])
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        module = image_text_module(str(tmp_path / "train-*.tar"), batch_size=2, num_workers=2, batches_per_epoch=7)
        loader = module.train_dataloader()
        assert len(loader) == 7 and len(all_batches(loader)) == 7


# ---------------------------------------------------------------- the other modalities, codes, mixture


def test_codes_are_loaded_as_int64_grids(tmp_path):
    grids = [np.arange(12, dtype=np.int16).reshape(3, 4) + i for i in range(3)]
    grids.append(np.full((3, 4), 40000, dtype=np.int32))  # a 65,536 codebook needs int32
    samples = [image_text_sample(i, **{"codes.npy": wds.numpy_dumps(grid)}) for i, grid in enumerate(grids)]
    samples.append(image_text_sample(9, **{"codes.npy": wds.numpy_dumps(np.zeros((3, 4), np.float32))}))
    shard = write_shard(tmp_path / "codes.tar", samples)
    module = image_text_module(shard, codes_key="codes.npy", batch_size=8, shuffle_buffer=0)
    batches = all_batches(module.train_dataloader())
    (batch,) = batches
    assert batch["codes"].dtype == torch.int64 and batch["codes"].shape == (4, 3, 4)
    assert torch.equal(batch["codes"], torch.from_numpy(np.stack(grids).astype(np.int64)))
    assert total_health(batches) == (5, 1) and "integer array" in batch["data_health"]["last_skip"]

    codes_only = image_text_module(shard, image_key=None, codes_key="codes.npy", batch_size=8, shuffle_buffer=0)
    assert "image" not in next(iter(codes_only.train_dataloader()))


def test_vqa_edit_and_knowledge_batches_follow_the_schema(tmp_path):
    vqa = write_shard(tmp_path / "vqa.tar", [
        {"__key__": f"{i}", "png": png_bytes(), "question.txt": b"How many circles?", "answer.txt": b"3", "json": b"{}"}
        for i in range(3)
    ])
    edit = write_shard(tmp_path / "edit.tar", [
        {"__key__": f"{i}", "source.png": png_bytes((255, 0, 0)), "target.png": png_bytes((0, 0, 255)),
         "txt": b"make it blue", "json": b'{"category": "adjust"}',
         "source.codes.npy": wds.numpy_dumps(np.ones((2, 2), np.int16)),
         "target.codes.npy": wds.numpy_dumps(np.zeros((2, 2), np.int16))}
        for i in range(3)
    ])
    knowledge = write_shard(tmp_path / "knowledge.tar", [
        {"__key__": f"{i}", "txt": b"three corners, like a ripe banana", "answer.txt": b"a yellow triangle"}
        for i in range(3)
    ])
    modules = {
        "vqa": VQADataModule(train_shards=vqa, resolution=RES, batch_size=3),
        "edit": EditDataModule(train_shards=edit, resolution=RES, batch_size=3,
                               source_codes_key="source.codes.npy", target_codes_key="target.codes.npy"),
        "knowledge": KnowledgeDataModule(train_shards=knowledge, meta_key=None, batch_size=3),
    }
    batches = {name: next(iter(module.train_dataloader())) for name, module in modules.items()}

    assert batches["vqa"]["image"].shape == (3, 3, RES, RES)
    assert batches["vqa"]["question"] == ["How many circles?"] * 3 and batches["vqa"]["answer"] == ["3"] * 3
    edit_batch = batches["edit"]
    # Sources stay at their stored size (the model prepares them as the sampler does); targets are stacked.
    assert [tuple(image.shape) for image in edit_batch["source_image"]] == [(3, RES, RES)] * 3
    assert all(image[0].mean() == 1.0 for image in edit_batch["source_image"])
    assert edit_batch["target_image"].shape == (3, 3, RES, RES) and edit_batch["target_image"][:, 2].mean() == 1.0
    assert edit_batch["instruction"] == ["make it blue"] * 3 and edit_batch["meta"][0] == {"category": "adjust"}
    assert edit_batch["source_codes"].dtype == torch.int64 and int(edit_batch["source_codes"].sum()) == 12
    assert batches["knowledge"]["prompt"][0] == "three corners, like a ripe banana"
    assert batches["knowledge"]["answer"] == ["a yellow triangle"] * 3 and batches["knowledge"]["meta"] == [{}] * 3
    assert {name: batch["task"] for name, batch in batches.items()} == {name: name for name in modules}


def test_conversation_samples_are_validated_turn_by_turn(tmp_path):
    chat = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a red circle"}]
    broken = [
        [{"role": "user", "content": "hi"}],  # nothing to learn from
        [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}],
        {"role": "user"},
    ]
    shard = write_shard(tmp_path / "chat.tar", [
        {"__key__": f"{i}", "png": png_bytes(), "conversation.json": json.dumps(turns).encode()}
        for i, turns in enumerate([chat] + broken)
    ])
    module = VQADataModule(train_shards=shard, resolution=RES, question_key=None, answer_key=None,
                           meta_key=None, conversation_key="conversation.json", batch_size=8, shuffle_buffer=0)
    (batch,) = all_batches(module.train_dataloader())
    assert batch["conversation"] == [chat] and "question" not in batch
    reasons = batch["data_health"]["recent_skips"]
    assert [r.split(" reason=")[1].split(" ", 1)[1] for r in reasons] == [
        "has no assistant turn to learn from",
        "turn 0 needs a role in ('system', 'user', 'assistant')",
        "turn 0 has empty content",
        "must be a non-empty list of turns",
    ]


def mixture(tmp_path: Path, seed: int, batches: int = 400) -> MixtureDataModule:
    t2i = write_image_text_shards(tmp_path, n_shards=2, per_shard=5)
    knowledge = write_shard(tmp_path / "knowledge.tar", [
        {"__key__": f"k{i}", "txt": f"riddle {i}".encode(), "answer.txt": b"a red circle"} for i in range(3)
    ])
    module = MixtureDataModule(
        components={
            "t2i": ImageTextDataModule(train_shards=t2i, resolution=RES, batch_size=2, seed=seed),
            "knowledge": KnowledgeDataModule(train_shards=knowledge, meta_key=None, batch_size=2, seed=seed),
        },
        weights={"t2i": 3.0, "knowledge": 1.0},
        batches_per_epoch=batches,
        seed=seed,
    )
    module.setup("fit")
    return module


def test_mixture_follows_weights_and_is_deterministic(tmp_path):
    def draws(seed):
        return [(batch["task"], tuple(batch["__key__"])) for batch in mixture(tmp_path, seed).train_dataloader()]

    first = draws(seed=0)
    tasks = Counter(task for task, _ in first)
    assert len(first) == 400 and 0.70 <= tasks["t2i"] / 400 <= 0.80
    assert first == draws(seed=0)
    assert first != draws(seed=1)


def test_modules_build_from_yaml_with_lightning_cli_types(tmp_path):
    shards = write_image_text_shards(tmp_path, n_shards=1, per_shard=2)
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--data", type=pl.LightningDataModule)
    config = parser.parse_string(f"""
data:
  class_path: lit_star.data.MixtureDataModule
  init_args:
    weights: {{t2i: 1.0}}
    batches_per_epoch: 3
    components:
      t2i:
        class_path: lit_star.data.ImageTextDataModule
        init_args: {{train_shards: "{shards}", resolution: {RES}, batch_size: 2, seed: 5, codes_key: null}}
""")
    data = parser.instantiate(config).data
    assert isinstance(data, MixtureDataModule)
    assert data.components["t2i"].batch_size == 2 and data.components["t2i"].seed == 5
    data.setup("fit")
    assert [batch["task"] for batch in data.train_dataloader()] == ["t2i"] * 3


def _gradient_png(width: int, height: int) -> bytes:
    """An RGB image whose pixels all differ, so that a crop and a stretch cannot give the same tensor."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_edit_sources_keep_their_stored_size_and_targets_are_stretched_not_cropped(tmp_path):
    sizes = [(40, 20), (12, 30), (RES, RES)]  # width x height: non-square, under 28 px, and already square
    edit = write_shard(tmp_path / "edit.tar", [
        {"__key__": f"{i}", "source.png": _gradient_png(w, h), "target.png": _gradient_png(w, h), "txt": b"make it blue",
         "json": b"{}"}
        for i, (w, h) in enumerate(sizes)
    ])
    batch = next(iter(EditDataModule(train_shards=edit, resolution=RES, batch_size=3).train_dataloader()))
    assert isinstance(batch["source_image"], list)
    for key, source, target in zip(batch["__key__"], batch["source_image"], batch["target_image"]):
        w, h = sizes[int(key)]
        stored = torch.from_numpy(np.asarray(Image.open(io.BytesIO(_gradient_png(w, h))))).permute(2, 0, 1)
        assert torch.equal(source, stored.float() / 127.5 - 1.0), "the source must arrive exactly as stored"
        stretched = Image.open(io.BytesIO(_gradient_png(w, h))).resize((RES, RES), Image.Resampling.BILINEAR)
        expected = torch.from_numpy(np.asarray(stretched)).permute(2, 0, 1).float() / 127.5 - 1.0
        assert torch.equal(target, expected), "the target is the whole image stretched, as the source's VQ view"
