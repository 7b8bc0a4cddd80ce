"""Decoders compared on ground-truth codes (paper Table 7a in small): the VQ decoder vs stage 3 decoders.

    python -m lit_star eval decoders --world runs/shapes_world --vq runs/shapes/stage1_vq/checkpoints/last.ckpt \\
        --stage3 runs/shapes/stage3_diffusion_decoder/checkpoints/last.ckpt --out runs/shapes/eval_decoders
    python -m lit_star eval decoders ... --size 128 --out runs/shapes/eval_sr128      # super-resolution

The ShapesEval ground-truth images (``WORLD/eval/geneval_gt``) are encoded by the VQ; their codes are decoded
by the VQ decoder and by every ``--stage3`` decoder (with the GT prompt), and each folder of decoded images is
scored by ShapesEval against the GT prompts, plus PSNR / SSIM against the GT images (at the GT size: decoded
images of another size are resized to it) and a Fréchet distance whose feature network is pluggable
(``--features PATH.pt2``, a ``torch.export`` file, see :class:`~lit_star.eval.vq_metrics.ExportedFeatures`;
default: a seeded random convolutional network, reported under that name, which ranks but is not FID).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lit_star.checkpoints import load_stage3, load_vq
from lit_star.eval.vq_metrics import ExportedFeatures, frechet_distance, reconstruction_metrics, to_unit_range
from lit_star.sampling.diffusion import GuidanceSettings, decode_codes_with_diffusion, to_pil
from lit_star.worlds.shapes.scorer import load_prompts, score_geneval


class RandomConvFeatures(nn.Module):
    """A seeded random conv net ([0, 1] images -> 256 features): a reproducible stand-in feature extractor."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, 256, 3, 2, 1), nn.AdaptiveAvgPool2d(1),
        )
        torch.random.set_rng_state(generator_state)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float()).flatten(1)


def _load_images(folder: Path, ids: list[str]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(folder / f"{i}.png").convert("RGB"), dtype=np.float32) for i in ids]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def image_metrics(decoded: torch.Tensor, truth: torch.Tensor, features: nn.Module, feature_name: str) -> dict:
    """PSNR / SSIM against ``truth`` (decoded resized to its size) and the Fréchet distance of the two sets."""
    if decoded.shape[-1] != truth.shape[-1]:
        decoded = nn.functional.interpolate(decoded, size=truth.shape[-2:], mode="bilinear", antialias=True,
                                            align_corners=False)
    metrics = reconstruction_metrics()
    metrics.update(to_unit_range(decoded), to_unit_range(truth))
    values = {k: float(v) for k, v in metrics.compute().items()}
    fd = frechet_distance(features, input_size=truth.shape[-1])
    fd.update(to_unit_range(truth), real=True)
    fd.update(to_unit_range(decoded), real=False)
    values[f"frechet_{feature_name}"] = float(fd.compute())
    return values


@torch.no_grad()
def compare_decoders(world: Path, vq_path: str, stage3: list[str], out: Path, size: int | None = None,
                     settings: GuidanceSettings = GuidanceSettings(40, 4.5, 1.05), features_path: str | None = None,
                     limit: int | None = None, batch_size: int = 50, seed: int = 0) -> dict:
    records = load_prompts(world / "eval" / "geneval.jsonl")
    if limit:
        by_category: dict[str, list] = {}
        for record in records:
            by_category.setdefault(record["category"], []).append(record)
        records = [r for rows in by_category.values() for r in rows[:limit]]
    ids = [r["id"] for r in records]
    truth = _load_images(world / "eval" / "geneval_gt", ids)
    vq = load_vq(vq_path)
    codes = torch.cat([vq.encode_to_codes(chunk) for chunk in truth.split(batch_size)])
    size = size or truth.shape[-1]
    features = ExportedFeatures(features_path) if features_path else RandomConvFeatures()
    feature_name = Path(features_path).stem if features_path else "random_conv"
    decoders: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        decoded = torch.cat([vq.decode_codes(chunk).float().clamp(-1, 1) for chunk in codes.split(batch_size)])
    if decoded.shape[-1] != size:
        decoded = nn.functional.interpolate(decoded, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    decoders["vq"] = decoded
    for index, ckpt in enumerate(stage3):
        loaded = load_stage3(ckpt, vq=vq_path)
        name = f"diffusion{index}" if len(stage3) > 1 else "diffusion"
        images = []
        for start in range(0, len(ids), batch_size):
            chunk = slice(start, start + batch_size)
            seeds = [seed + i for i in range(start, min(start + batch_size, len(ids)))]
            images.append(decode_codes_with_diffusion(loaded.decoder, loaded.scheduler, vq, codes[chunk],
                                                      [r["prompt"] for r in records[chunk]], seeds, size, settings))
        decoders[name] = torch.cat(images)
    results = {"size": size, "gt_size": int(truth.shape[-1]), "prompts": len(ids), "stage3": stage3,
               "settings": settings.as_dict(), "decoders": {}}
    for name, images in decoders.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in zip(ids, to_pil(images)):
            image.save(folder / f"{i}.png")
        scores = score_geneval(records, folder)
        results["decoders"][name] = {"overall": scores["overall"], "categories": scores["categories"],
                                     **image_metrics(images, truth, features, feature_name)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_comparison(results: dict) -> str:
    names = list(results["decoders"])
    categories = list(next(iter(results["decoders"].values()))["categories"])
    metric_keys = [k for k in next(iter(results["decoders"].values())) if k not in ("categories",)]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in metric_keys:
        lines.append(f"| {key} | " + " | ".join(f"{results['decoders'][n][key]:.3f}" for n in names) + " |")
    for category in categories:
        lines.append(f"| {category} | " + " | ".join(f"{results['decoders'][n]['categories'][category]:.3f}"
                                                     for n in names) + " |")
    return "\n".join(lines)
