"""Validation metrics for the VQ tokenizer: PSNR / SSIM (torchmetrics), a Fréchet distance over a
pluggable local feature network, codebook utilisation and code perplexity.

All are ``torchmetrics.Metric`` objects, so they accumulate over a validation epoch and reduce
across processes under DDP/FSDP.

The Fréchet distance is torchmetrics' ``FrechetInceptionDistance`` with ``feature=`` set to a
network loaded from a local ``torch.export`` file; it is logged as ``frechet_<name>`` after the
features it uses (it is not FID unless the network is Inception-v3 with its FID weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] images to [0, 1] (clamped), the range every metric here expects."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def reconstruction_metrics() -> MetricCollection:
    """PSNR (dB) and SSIM on [0, 1] images, reduced over all pixels of the epoch."""
    return MetricCollection(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        }
    )


class ExportedFeatures(nn.Module):
    """A frozen feature network from a local ``torch.export`` file (``.pt2``): [0, 1] B x 3 x H x W -> B x F.

    Any network becomes pluggable by exporting it once with a dynamic batch dimension::

        batch = torch.export.Dim("batch")
        program = torch.export.export(net.eval(), (torch.rand(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
        torch.export.save(program, "efficientnet_lite0_features.pt2")

    ``input_size`` resizes inputs (bilinear, antialiased) to the size the network was exported for.
    """

    def __init__(self, path: str | Path, input_size: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Fréchet feature network not found: {path}")
        self.net = torch.export.load(str(path)).module()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.input_size = input_size

    def train(self, mode: bool = True) -> ExportedFeatures:
        # Exported programs have no train/eval switch; this module is always in inference mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.input_size is not None and images.shape[-2:] != (self.input_size, self.input_size):
            images = nn.functional.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.net(images).flatten(1)


def frechet_distance(features: nn.Module, input_size: int = 64) -> FrechetInceptionDistance:
    """torchmetrics' Fréchet distance over ``features`` (inputs: [0, 1] floats of ``input_size`` px)."""
    return FrechetInceptionDistance(
        feature=features, normalize=True, input_img_size=(3, input_size, input_size), reset_real_features=True
    )


class CodebookUsage(Metric):
    """Fraction of the codebook used, and code perplexity, over a window of validation tokens.

    Counts every code id seen until ``window_tokens`` tokens have been counted on this process
    (``None``: the whole epoch). Utilisation is ``#codes with count > 0 / codebook_size``; perplexity is
    ``exp(entropy)`` of the empirical code distribution (``codebook_size`` at uniform use, 1 at collapse).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, codebook_size: int, window_tokens: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.window_tokens = window_tokens
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        codes = codes.reshape(-1).long()
        if self.window_tokens is not None:
            room = self.window_tokens - int(self.counts.sum())
            if room <= 0:
                return
            codes = codes[:room]
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"code ids outside [0, {self.codebook_size}): min {int(codes.min())}, max {int(codes.max())}")
        self.counts += torch.bincount(codes, minlength=self.codebook_size)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.counts.sum()
        if total == 0:
            raise RuntimeError("CodebookUsage.compute() before any code was counted")
        probs = self.counts.double() / total
        nonzero = probs[probs > 0]
        entropy = -(nonzero * nonzero.log()).sum()
        return {
            "utilisation": (self.counts > 0).double().mean().float(),
            "perplexity": entropy.exp().float(),
        }
