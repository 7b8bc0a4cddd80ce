"""Pre-tokenize image shards with a trained VQ (stage 1 -> stage 2), resumably.

    python -m lit_star tokenize --vq runs/shapes_vq/checkpoints/last.ckpt \\
        --shards 'runs/shapes_world/t2i/train-*.tar' --out runs/shapes_world_codes/t2i

Every input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` with the same members plus, per image member
``<prefix>png`` (``png``, ``source.png``, ``target.png``, ...), the codes ``<prefix>codes.npy``
(h x w, int16, or int32 when the codebook has more than 32,767 codes) and one ``codes_shape.json``
(``{"<prefix>codes.npy": [h, w], ...}``). Shards are written to a temporary file and renamed when
complete, so a rerun skips every finished shard and redoes only the interrupted one.

``--vae DIR`` (an ``AutoencoderKL`` directory, e.g. Lumina-Image-2.0's ``vae/``) also writes, per image member,
``<prefix>latents.npy``: the VAE posterior's mean and log-variance stacked (2C x h x w, float16), from which
stage 3 draws its latent sample per step (``ImageTextDataModule(latents_key="latents.npy")``). ``--vq`` and
``--vae`` may be given alone or together.

With ``--resolution``, images are resized and centre-cropped as ``ImageTextDataModule`` does; edit shards need
``--resize stretch``, the whole image stretched as ``EditDataModule`` stretches an edit's target, so that the
pre-tokenized ``target.codes.npy`` are the codes of the batch's ``target_image``.

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
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from lit_star.checkpoints import load_vq
from lit_star.data.images import (
    decode_image,
    resize_center_crop,
    rgb_to_tensor,
    stretch_to_square,
)
from lit_star.data.webdataset_io import reproducible_tar_writer
from lit_star.models.vq import VQModel

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CODES_SHAPE_KEY = "codes_shape.json"
INT16_MAX_CODES = 32767
Resize = Literal["crop", "stretch"]


def codes_dtype(codebook_size: int) -> np.dtype:
    """Smallest signed dtype torch loads well (no uint16) that holds every code id."""
    return np.dtype(np.int16) if codebook_size <= INT16_MAX_CODES else np.dtype(np.int32)


def image_members(sample: dict) -> list[str]:
    """Image member names of a raw webdataset sample (``png``, ``source.png``, ...), sorted."""
    return sorted(k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def codes_member(image_member: str, suffix: str = "codes") -> str:
    stem = image_member.rsplit(".", 1)[0] if "." in image_member else ""
    return f"{stem}.{suffix}.npy" if stem else f"{suffix}.npy"


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardTokenizer:
    """Encodes the images of one shard at a time and writes the augmented shard atomically."""

    def __init__(self, vq: VQModel | None, device: torch.device, batch_size: int, resolution: int | None,
                 vae=None, resize: Resize = "crop") -> None:
        if resize not in ("crop", "stretch"):
            raise ValueError(f"resize must be 'crop' or 'stretch', got {resize!r}")
        self.resize = resize
        self.vq = vq.to(device).eval() if vq is not None else None
        self.vae = vae.to(device).eval() if vae is not None else None
        self.device = device
        self.batch_size = batch_size
        self.resolution = resolution
        self.dtype = codes_dtype(vq.config.codebook_size) if vq is not None else None
        self.seen = 0
        self.skipped = 0

    def _pixels(self, data: bytes) -> torch.Tensor:
        image = decode_image(data)
        if self.resolution is not None:
            resize = stretch_to_square if self.resize == "stretch" else resize_center_crop
            image = resize(image, self.resolution)
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

    @torch.no_grad()
    def _encode_latents(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        """The VAE posterior (mean and log-variance, 2C x h x w, float16) of each image."""
        out: list[np.ndarray] = []
        for tensor in pixels:
            posterior = self.vae.encode(tensor[None].to(self.device, self.vae.dtype)).latent_dist
            out.append(torch.cat([posterior.mean, posterior.logvar], 1)[0].float().cpu().numpy().astype(np.float16))
        return out

    def _flush(self, pending: list[dict], writer: wds.TarWriter) -> None:
        jobs = [(n, member) for n, sample in enumerate(pending) for member in image_members(sample)]
        pixels = [pending[n]["__pixels__"][member] for n, member in jobs]
        if self.vq is not None:
            for (n, member), grid in zip(jobs, self._encode(pixels) if jobs else []):
                pending[n][codes_member(member)] = encode_npy(grid)
                pending[n].setdefault("__shapes__", {})[codes_member(member)] = list(grid.shape)
        if self.vae is not None:
            for (n, member), latents in zip(jobs, self._encode_latents(pixels) if jobs else []):
                pending[n][codes_member(member, "latents")] = encode_npy(latents)
                pending[n].setdefault("__shapes__", {})[codes_member(member, "latents")] = list(latents.shape)
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
    shards: str,
    out: str,
    vq: str | None = None,
    vae: str | None = None,
    flavour: str | None = None,
    batch_size: int = 64,
    resolution: int | None = None,
    device: str = "auto",
    max_skip_fraction: float = 0.01,
    resize: Resize = "crop",
) -> int:
    """Encode image shards into VQ code shards and/or VAE latents (resumable: finished shards are skipped).

    Args:
        shards: input shard glob, quoted: ``'DIR/t2i/train-*.tar'``.
        out: output directory (shard names are kept).
        vq: VQModule .ckpt, save_pretrained directory, or reference VQ-Model.pt (give ``flavour``).
        vae: AutoencoderKL directory: also write ``<prefix>latents.npy`` (stage 3).
        flavour: VQ flavour of a reference-layout .pt (e.g. star-vq).
        batch_size: images encoded together.
        resolution: resize first (default: native size), as ``resize`` says.
        resize: ``crop`` (shorter side, then the centre; image-text and VQA shards) or ``stretch`` (the whole image
            to the square, bilinear; edit shards, as ``EditDataModule`` prepares their targets).
        device: ``auto`` (cuda if available), cpu, cuda, cuda:1, ...
        max_skip_fraction: fail when more than this share of samples is unreadable.
    """
    if vq is None and vae is None:
        print("tokenize: give --vq, --vae or both", file=sys.stderr)
        return 2
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
    vae_model = None
    if vae is not None:
        from diffusers import AutoencoderKL

        vae_model = AutoencoderKL.from_pretrained(vae, local_files_only=True)
    vq_model = load_vq(vq, flavour) if vq is not None else None
    tokenizer = ShardTokenizer(vq_model, torch_device, batch_size, resolution, vae_model, resize)
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
