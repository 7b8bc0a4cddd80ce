"""Losses for training the VQ tokenizer (stage 1): reconstruction, LPIPS-style perceptual loss,
PatchGAN discriminator, GAN objectives and the taming-style adaptive GAN weight.

Pure ``nn.Module`` code (no Lightning); :class:`lit_star.modules.vq_module.VQModule` wires it together.

The perceptual network never initialises itself randomly: it loads a VGG16 backbone in torchvision's
state-dict layout (``features.{i}.weight``, e.g. ``vgg16-397923af.pth``) and LPIPS v0.1 linear heads
(``lin{k}.model.1.weight``, e.g. LPIPS's ``weights/v0.1/vgg.pth``) from local files. Without them
:func:`build_perceptual_loss` returns ``None`` and says so in one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean L1 or L2 (squared error) between reconstruction and target."""
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ValueError(f"reconstruction loss kind must be 'l1' or 'l2', got {kind!r}")


# --------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS-style)

# VGG16 configuration D: output channels per conv, "M" for max-pooling. The Sequential built from it
# reproduces torchvision's ``vgg16().features`` indices, so its state dict loads key for key.
_VGG16_LAYOUT = (0, 0, "M", 1, 1, "M", 2, 2, 2, "M", 3, 3, 3, "M", 4, 4, 4, "M")
# Index of the ReLU that ends each LPIPS stage (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_LPIPS_TAPS = (3, 8, 15, 22, 29)
# Input normalisation the LPIPS v0.1 heads were trained with (inputs in [-1, 1]).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk returning the five LPIPS feature maps.

    ``widths`` defaults to the real VGG16; smaller widths only serve tests of the code path.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"VGG16Features needs 5 stage widths, got {list(widths)}")
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, widths[item], kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                in_ch = widths[item]
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])  # the last pool is never used
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _LPIPS_TAPS:
                taps.append(x)
        return taps


class _LinearHead(nn.Module):
    """One LPIPS head: dropout then a bias-free 1x1 conv to one channel (key ``model.1.weight``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.5), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on a VGG16 trunk; frozen, always in eval mode."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        self.net = VGG16Features(widths)
        for k, ch in enumerate(self.net.widths):
            self.add_module(f"lin{k}", _LinearHead(ch))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen metric network: dropout in the heads must never be active.
        return super().train(False)

    @classmethod
    def from_files(cls, backbone_path: str | Path, heads_path: str | Path) -> LPIPS:
        """Load a torchvision-layout VGG16 state dict and LPIPS v0.1 heads; every needed key must be present."""
        backbone = _load_state_dict(backbone_path)
        heads = _load_state_dict(heads_path)
        feature_keys = {k: v for k, v in backbone.items() if k.startswith("features.")}
        if not feature_keys:
            raise KeyError(f"{backbone_path}: no 'features.*' keys; expected a torchvision VGG16 state dict")
        widths = tuple(int(feature_keys[f"features.{i}.weight"].shape[0]) for i in (2, 7, 14, 21, 28))
        model = cls(widths)
        wanted = model.net.state_dict().keys()
        missing = sorted(set(wanted) - set(feature_keys))
        if missing:
            raise KeyError(f"{backbone_path}: missing VGG16 keys {missing[:4]}{'...' if len(missing) > 4 else ''}")
        model.net.load_state_dict({k: feature_keys[k] for k in wanted}, strict=True)
        head_keys = {k: v for k, v in heads.items() if k.startswith("lin")}
        expected = {k for k in model.state_dict() if k.startswith("lin")}
        if set(head_keys) != expected:
            raise KeyError(
                f"{heads_path}: LPIPS heads do not match: missing {sorted(expected - set(head_keys))}, "
                f"unexpected {sorted(set(head_keys) - expected)}"
            )
        model.load_state_dict(head_keys, strict=False)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance (B,) between images in [-1, 1]."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_channels(a) - _unit_channels(b)) ** 2
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return total


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual loss weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_perceptual_loss(backbone_path: str | None, heads_path: str | None) -> LPIPS | None:
    """The LPIPS network from local files, or ``None`` (logged once) when no weights are given."""
    if backbone_path is None and heads_path is None:
        log.warning(
            "Perceptual loss DISABLED: no local weights given (set perceptual_backbone and perceptual_heads to a "
            "torchvision VGG16 state dict and LPIPS v0.1 heads); training uses reconstruction + VQ (+ GAN) losses only."
        )
        return None
    if backbone_path is None or heads_path is None:
        raise ValueError(
            "perceptual loss needs both perceptual_backbone (VGG16 state dict) and perceptual_heads (LPIPS heads); "
            f"got backbone={backbone_path!r}, heads={heads_path!r}"
        )
    return LPIPS.from_files(backbone_path, heads_path)


# --------------------------------------------------------------------------------------------------
# PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017): a grid of real/fake logits, one per receptive-field patch.

    ``norm`` is ``"batch"`` (pix2pix / taming / LlamaGen) or ``"group"`` (independent of batch statistics,
    robust to tiny per-device batches).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(ch: int) -> nn.Module:
            return nn.BatchNorm2d(ch) if norm == "batch" else nn.GroupNorm(min(32, ch), ch)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for n in range(1, num_layers + 1):
            out_ch = width * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(ch, out_ch, 4, stride, 1, bias=False), norm_layer(out_ch), nn.LeakyReLU(0.2, True)]
            ch = out_ch
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_discriminator(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# GAN objectives


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


GAN_LOSSES = {
    "hinge": (hinge_d_loss, hinge_g_loss),
    "non_saturating": (non_saturating_d_loss, non_saturating_g_loss),
}


def gan_losses(kind: str):
    """``(discriminator_loss(real, fake), generator_loss(fake))`` for ``kind`` in :data:`GAN_LOSSES`."""
    if kind not in GAN_LOSSES:
        raise ValueError(f"gan loss must be one of {sorted(GAN_LOSSES)}, got {kind!r}")
    return GAN_LOSSES[kind]


def adaptive_gan_weight(
    nll_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||d nll / d W|| / ||d g / d W|| at the decoder's last layer W (Esser et al. 2021), clamped and detached.

    Balances the GAN gradient against the reconstruction gradient where both reach the pixels.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
