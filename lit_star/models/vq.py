"""STAR-VQ: the VQGAN-style image tokenizer of stage 1 (LlamaGen / STAR-VQ shape).

    from lit_star.models.vq import VQModel, vq_config
    vq = VQModel.from_pretrained("VQ-Model.pt", vq_config("star-vq"))   # released weights
    codes = vq.encode_to_codes(images)          # images in [-1, 1], B x 3 x H x W -> B x h x w int64
    images = vq.decode_codes(codes)             # B x 3 x H x W, raw decoder output (about [-1, 1])
    vectors = vq.codebook_vectors(codes)        # codes.shape + (D,): what the stage-2 adapter consumes

Parameter names follow the reference ``VQ-Model.pt`` layout exactly (``encoder.conv_blocks.{i}.res.{j}``,
``quantize.embedding.weight``, the ``quantize.codebook_used`` window buffer, ...), so a released file loads
strictly and :meth:`VQModel.reference_state_dict` writes one back. Encoder, decoder and attention evaluate
in the reference's operation order so that codes are bit-identical on the same hardware.

The parts: :mod:`~lit_star.models.vq_config` (``VQConfig`` and the flavours), :mod:`~lit_star.models.vq_autoencoder`
(encoder, decoder) and :mod:`~lit_star.models.quantizer` (nearest-code search, losses). Their public names are
importable from here too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lit_star.models.quantizer import QuantizerOutput, VectorQuantizer, entropy_loss, nearest_code_indices
from lit_star.models.vq_autoencoder import Decoder, Encoder
from lit_star.models.vq_config import DEFAULT_SEARCH_CHUNK_ELEMENTS, VQ_FLAVOURS, VQConfig, vq_config

__all__ = ["CONFIG_FILE", "DEFAULT_SEARCH_CHUNK_ELEMENTS", "PROJECTOR_PREFIX", "VQ_FLAVOURS", "WEIGHTS_FILE",
           "QuantizerOutput", "VQConfig", "VQModel", "VQOutput", "VectorQuantizer", "entropy_loss",
           "nearest_code_indices", "parameter_counts", "vq_config"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys that exist only while training with the codebook projector; never exported.
PROJECTOR_PREFIX = "quantize.projector."


@dataclass
class VQOutput:
    """Training forward result: ``reconstruction`` B x 3 x H x W plus the quantizer's losses and stats."""

    reconstruction: Tensor
    quantizer: QuantizerOutput

    @property
    def codes(self) -> Tensor:
        return self.quantizer.codes


class VQModel(nn.Module):
    """Encoder -> quant_conv -> vector quantizer -> post_quant_conv -> decoder."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        common = dict(ch=config.ch, num_res_blocks=config.num_res_blocks, z_channels=config.z_channels,
                      dropout=config.dropout_p, attn_num_heads=config.attn_num_heads)
        self.encoder = Encoder(ch_mult=config.encoder_ch_mult, local=config.local_encoder, **common)
        self.decoder = Decoder(ch_mult=config.decoder_ch_mult, **common)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    # ---- training

    def forward(self, images: Tensor) -> VQOutput:
        """Reconstruct ``images`` ([-1, 1], B x 3 x H x W, H and W divisible by the downsampling factor)."""
        quant = self.quantize(self.quant_conv(self.encoder(self._check_images(images))))
        return VQOutput(reconstruction=self.decode_quantized(quant.quantized), quantizer=quant)

    def decode_quantized(self, quantized: Tensor) -> Tensor:
        """B x D x h x w code vectors -> B x 3 x H x W images."""
        return self.decoder(self.post_quant_conv(quantized))

    # ---- inference API

    @torch.no_grad()
    def encode_to_codes(self, images: Tensor) -> Tensor:
        """[-1, 1] images B x 3 x H x W -> B x h x w int64 codes (h = H / downsample_factor)."""
        z = self.quant_conv(self.encoder(self._check_images(images)))
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.quantize.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        return nearest_code_indices(flat, self.quantize.codebook(), self.quantize.search_chunk_elements).view(b, h, w)

    def codebook_vectors(self, codes: Tensor) -> Tensor:
        """Codebook rows for ``codes`` of any shape: returns ``codes.shape + (D,)`` (B x h x w x D for a grid,
        B x L x D for a flattened sequence). These are the D-dim vectors the stage-2 adapter consumes."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes.long(), self.quantize.codebook())

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """B x h x w integer codes -> B x 3 x H x W images (raw decoder output, about [-1, 1], not clamped)."""
        if codes.ndim != 3:
            raise ValueError(f"decode_codes expects B x h x w codes, got shape {tuple(codes.shape)}")
        return self.decode_quantized(self.codebook_vectors(codes).permute(0, 3, 1, 2).contiguous())

    def _check_images(self, images: Tensor) -> Tensor:
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"expected B x 3 x H x W images with H, W divisible by {f}, got {tuple(images.shape)}")
        return images

    # ---- export / import

    @torch.no_grad()
    def reference_state_dict(self) -> dict[str, Tensor]:
        """State dict in the reference ``VQ-Model.pt`` layout: the projector folded into the codebook.

        The folded ``quantize.embedding.weight`` is the projector's output (before any l2 normalisation,
        which the reference applies at use), so codes and decodes are unchanged by export.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(PROJECTOR_PREFIX)}
        if self.quantize.projector is not None:
            state["quantize.embedding.weight"] = self.quantize.projector(self.quantize.embedding.weight).detach().clone()
        return state

    def exported_config(self) -> VQConfig:
        """The config matching :meth:`reference_state_dict` (projector folded away)."""
        return dataclasses.replace(self.config, codebook_projector=False)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (reference key layout, projector folded) and ``config.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.reference_state_dict().items()}, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.exported_config().to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, config: VQConfig | str | None = None,
                        map_location: str | torch.device = "cpu") -> "VQModel":
        """Load a reference-layout raw state dict (``VQ-Model.pt``) or a :meth:`save_pretrained` directory.

        ``config`` (a :class:`VQConfig` or flavour name) is required for a ``.pt`` file; for a directory it
        defaults to its ``config.json``. Loading is strict: a missing or unexpected key raises an error
        naming the keys. Any projector in ``config`` is switched off, since exported weights are folded.
        """
        path = Path(path)
        if path.is_dir():
            config_file = path / CONFIG_FILE
            if config is None:
                if not config_file.is_file():
                    raise FileNotFoundError(f"{config_file} not found: pass config= or export with save_pretrained")
                config = VQConfig.from_dict(json.loads(config_file.read_text()))
            from safetensors.torch import load_file

            weights = path / WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found in {path}")
            state = load_file(str(weights), device=str(map_location))
        elif path.is_file():
            if config is None:
                raise ValueError(f"{path} is a raw state dict: pass config= (a VQConfig or a flavour name)")
            state = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{path} is not a raw state dict of tensors (reference VQ-Model.pt layout)")
        else:
            raise FileNotFoundError(f"no VQ checkpoint at {path}")
        if isinstance(config, str):
            config = vq_config(config)
        model = cls(dataclasses.replace(config, codebook_projector=False))
        model.load_reference_state_dict(state, source=str(path))
        return model

    def load_reference_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Strictly load a reference-layout state dict; errors name missing/unexpected/mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mis_shaped:
            lines = [f"{source} does not match the VQ config:"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {missing[:20]}")
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
            for k in mis_shaped[:20]:
                lines.append(f"  shape mismatch {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
            raise KeyError("\n".join(lines))
        # codebook_used is stored as float in fresh reference checkpoints; load_state_dict casts it.
        self.load_state_dict(state, strict=True)

    @torch.no_grad()
    def fold_codebook_projector(self) -> None:
        """Replace the codebook by its projection and drop the projector (e.g. before tokenizing)."""
        if self.quantize.projector is None:
            return
        self.quantize.embedding.weight.copy_(self.quantize.projector(self.quantize.embedding.weight))
        self.quantize.projector = None
        self.config = self.exported_config()


def parameter_counts(model: VQModel) -> dict[str, int]:
    """Parameters per part (encoder, decoder, quantizer incl. projector, quant convs)."""
    parts = {"encoder": model.encoder, "decoder": model.decoder, "quantize": model.quantize,
             "quant_convs": nn.ModuleList([model.quant_conv, model.post_quant_conv])}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
