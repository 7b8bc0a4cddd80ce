"""Pre-tokenize image shards with a trained VQ (stage 1 -> stage 2), resumably.

    python -m lit_star tokenize --vq runs/shapes_vq/checkpoints/last.ckpt \\
        --shards 'runs/shapes_world/t2i/train-*.tar' --out runs/shapes_world_codes/t2i

Every input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` with the same members plus, per image member
``<prefix>png`` (``png``, ``source.png``, ``target.png``, ...), the codes ``<prefix>codes.npy``
(h x w, int16, or int32 when the codebook has more than 32,767 codes) and one ``codes_shape.json``
(``{"<prefix>codes.npy": [h, w], ...}``). Shards are written to a temporary file and renamed when
complete, so a rerun skips every finished shard and redoes only the interrupted one.

``--vq`` accepts a ``VQModule`` Lightning checkpoint (EMA weights when present), a directory written
by ``VQModel.save_pretrained``, or a reference-layout ``VQ-Model.pt`` (give ``--flavour``).
Unreadable images are skipped, counted and named; the run fails past ``--max_skip_fraction``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from lit_star.checkpoints import load_vq
from lit_star.data.images import decode_image, resize_center_crop, rgb_to_tensor
from lit_star.data.webdataset_io import reproducible_tar_writer
from lit_star.models.vq import VQModel

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CODES_SHAPE_KEY = "codes_shape.json"
INT16_MAX_CODES = 32767


def codes_dtype(codebook_size: int) -> np.dtype:
    """Smallest signed dtype torch loads well (no uint16) that holds every code id."""
    return np.dtype(np.int16) if codebook_size <= INT16_MAX_CODES else np.dtype(np.int32)


def image_members(sample: dict) -> list[str]:
    """Image member names of a raw webdataset sample (``png``, ``source.png``, ...), sorted."""
    return sorted(k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def codes_member(image_member: str) -> str:
    stem = image_member.rsplit(".", 1)[0] if "." in image_member else ""
    return f"{stem}.codes.npy" if stem else "codes.npy"


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardTokenizer:
    """Encodes the images of one shard at a time and writes the augmented shard atomically."""

    def __init__(self, vq: VQModel, device: torch.device, batch_size: int, resolution: int | None) -> None:
        self.vq = vq.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.resolution = resolution
        self.dtype = codes_dtype(vq.config.codebook_size)
        self.seen = 0
        self.skipped = 0

    def _pixels(self, data: bytes) -> torch.Tensor:
        image = decode_image(data)
        if self.resolution is not None:
            image = resize_center_crop(image, self.resolution)
        return rgb_to_tensor(image)

    @torch.no_grad()
    def _encode(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        """Codes for each image, batching images of equal size together."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(pixels):
            by_shape.setdefault(tuple(tensor.shape), []).append(index)
        codes: list[np.ndarray] = [np.empty(0)] * len(pixels)
        for indices in by_shape.values():
            batch = torch.stack([pixels[i] for i in indices]).to(self.device)
            for i, grid in zip(indices, self.vq.encode_to_codes(batch).cpu().numpy()):
                codes[i] = grid.astype(self.dtype)
        return codes

    def _flush(self, pending: list[dict], writer: wds.TarWriter) -> None:
        jobs = [(n, member) for n, sample in enumerate(pending) for member in image_members(sample)]
        encoded = self._encode([pending[n]["__pixels__"][member] for n, member in jobs]) if jobs else []
        for (n, member), grid in zip(jobs, encoded):
            pending[n][codes_member(member)] = encode_npy(grid)
            pending[n].setdefault("__shapes__", {})[codes_member(member)] = list(grid.shape)
        for sample in pending:
            shapes = sample.pop("__shapes__", {})
            sample.pop("__pixels__")
            sample[CODES_SHAPE_KEY] = json.dumps(shapes).encode()
            writer.write(sample)
        pending.clear()

    def tokenize_shard(self, source: Path, target: Path) -> int:
        """Write ``target`` (via a temporary file); returns the number of samples written."""
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        written = 0
        dataset = wds.WebDataset(str(source), shardshuffle=False, handler=wds.handlers.reraise_exception, empty_check=False)
        try:
            with open(tmp, "wb") as stream, reproducible_tar_writer(stream) as writer:
                pending: list[dict] = []
                for raw in dataset:
                    sample = {k: v for k, v in raw.items() if k not in ("__url__", "__local_path__")}
                    self.seen += 1
                    members = image_members(sample)
                    try:
                        sample["__pixels__"] = {m: self._pixels(sample[m]) for m in members}
                    except Exception as error:  # noqa: BLE001 - any undecodable image is skipped and named
                        self.skipped += 1
                        log.warning("skipped shard=%s key=%s reason=%s", source, sample.get("__key__"), error)
                        continue
                    pending.append(sample)
                    written += 1
                    if len(pending) >= self.batch_size:
                        self._flush(pending, writer)
                self._flush(pending, writer)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return written


def tokenize(
    vq: str,
    shards: str,
    out: str,
    flavour: str | None = None,
    batch_size: int = 64,
    resolution: int | None = None,
    device: str = "auto",
    max_skip_fraction: float = 0.01,
) -> int:
    """Encode image shards into VQ code shards with a VQ checkpoint (resumable: finished shards are skipped).

    Args:
        vq: VQModule .ckpt, save_pretrained directory, or reference VQ-Model.pt (give ``flavour``).
        shards: input shard glob, quoted: ``'DIR/t2i/train-*.tar'``.
        out: output directory (shard names are kept).
        flavour: VQ flavour of a reference-layout .pt (e.g. star-vq).
        batch_size: images encoded together.
        resolution: resize + centre-crop first (default: native size).
        device: ``auto`` (cuda if available), cpu, cuda, cuda:1, ...
        max_skip_fraction: fail when more than this share of samples is unreadable.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shard_paths = sorted(Path(p) for p in glob.glob(shards))
    if not shard_paths:
        print(f"tokenize: no shards match {shards!r}", file=sys.stderr)
        return 2
    names = [s.name for s in shard_paths]
    if len(set(names)) != len(names):
        print(f"tokenize: shards matches several files with the same name; narrow {shards!r}", file=sys.stderr)
        return 2
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shard_paths if not (out_dir / s.name).exists()]
    print(f"tokenize: {len(shard_paths)} shards, {len(shard_paths) - len(todo)} already done, {len(todo)} to encode -> {out_dir}")
    if not todo:
        return 0
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    tokenizer = ShardTokenizer(load_vq(vq, flavour), torch_device, batch_size, resolution)
    with tqdm(todo, unit="shard", desc="tokenize") as progress:
        for shard in progress:
            written = tokenizer.tokenize_shard(shard, out_dir / shard.name)
            progress.set_postfix(samples=tokenizer.seen, skipped=tokenizer.skipped, last=f"{shard.name}:{written}")
            if tokenizer.seen and tokenizer.skipped / tokenizer.seen > max_skip_fraction:
                print(
                    f"tokenize: {tokenizer.skipped}/{tokenizer.seen} samples unreadable (> {max_skip_fraction:.2%}); "
                    "see the warnings above for shards and keys",
                    file=sys.stderr,
                )
                return 1
    print(f"tokenize: encoded {tokenizer.seen - tokenizer.skipped} samples, skipped {tokenizer.skipped}")
    return 0
