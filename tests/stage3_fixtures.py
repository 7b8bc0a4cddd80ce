"""Tiny stage 3 inputs built in code: a Lumina-Image-2.0-shaped directory and the reference's decoder tree.

The reference (MM-MVR/STAR ``star/models/pixel_decoder/lumina2_decoder.py``, NOTES section 2) registers three
submodules on its ``Lumina2Decoder``: ``transformer`` (the stock Lumina2 DiT loaded with ``in_channels`` 16,
whose ``x_embedder`` it replaces by a Linear over 4 x (16 + 512) inputs and to which it assigns
``ori_inp_refiner`` = Sequential(Linear(d, d), GELU(tanh), Linear(d, d, bias=False))), ``vae`` (AutoencoderKL)
and ``text_encoder_one`` (Gemma2Model). :func:`reference_decoder_tree` builds that tree at tiny sizes, and
:func:`reference_dit_forward` computes its DiT forward the way ``transformer_lumina2_seq.py`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, Lumina2Transformer2DModel
from torch import nn

from lit_star.models.diffusion_decoder import build_scheduler, tiny_text_encoder

LATENT = 4
CODE_DIM = 8  # the small VQ of stage2_fixtures
DIT = dict(patch_size=2, hidden_size=32, num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
           multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 6, 6), axes_lens=(300, 32, 32), cap_feat_dim=16)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
           latent_channels=LATENT, norm_num_groups=4, sample_size=32, shift_factor=0.1, scaling_factor=1.5)


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module


def write_tiny_lumina(directory: Path, seed: int = 0) -> Path:
    """A Lumina-Image-2.0-layout directory (transformer/, vae/, text_encoder/, tokenizer/, scheduler/) at tiny sizes."""
    torch.manual_seed(seed)
    _perturb(Lumina2Transformer2DModel(in_channels=LATENT, **DIT), seed).save_pretrained(directory / "transformer")
    AutoencoderKL(**VAE).save_pretrained(directory / "vae")
    tokenizer, encoder = tiny_text_encoder(hidden_size=16, num_layers=2, seed=seed)
    encoder.save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    build_scheduler(shift=6.0).save_pretrained(directory / "scheduler")
    return directory


class ReferenceDecoderTree(nn.Module):
    """The reference's ``Lumina2Decoder`` submodules, by name, at tiny sizes (channel/"seq" mode)."""

    def __init__(self, lumina: Path, seed: int = 1, code_dim: int = CODE_DIM) -> None:
        super().__init__()
        transformer = Lumina2Transformer2DModel.from_pretrained(lumina / "transformer")
        p, hidden = transformer.config.patch_size, transformer.config.hidden_size
        transformer.x_embedder = nn.Linear((LATENT + code_dim) * p * p, hidden)
        transformer.ori_inp_refiner = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"),
                                                    nn.Linear(hidden, hidden, bias=False))
        self.transformer = _perturb(transformer, seed)
        self.vae = _perturb(AutoencoderKL.from_pretrained(lumina / "vae"), seed + 1)
        from transformers import Gemma2Model

        self.text_encoder_one = _perturb(Gemma2Model.from_pretrained(lumina / "text_encoder"), seed + 2)


def reference_checkpoint_state(tree: ReferenceDecoderTree) -> dict[str, torch.Tensor]:
    return {f"diffusion_decoder.{k}": v.detach().clone() for k, v in tree.state_dict().items()}


@torch.no_grad()
def reference_dit_forward(dit: Lumina2Transformer2DModel, hidden_states, timestep, caption, caption_mask):
    """The reference DiT's forward: stock Lumina2 with the second half of the image tokens replaced by
    ``ori_inp_refiner`` after ``noise_refiner``."""
    batch, _, height, width = hidden_states.shape
    temb, caption = dit.time_caption_embed(hidden_states, timestep, caption)
    tokens, caption_rope, image_rope, rope, caption_lengths, lengths = dit.rope_embedder(hidden_states, caption_mask)
    tokens = dit.x_embedder(tokens)
    for layer in dit.context_refiner:
        caption = layer(caption, caption_mask, caption_rope)
    for layer in dit.noise_refiner:
        tokens = layer(tokens, None, image_rope, temb)
    half = tokens.shape[1] // 2
    tokens = torch.cat([tokens[:, :half], dit.ori_inp_refiner(tokens[:, half:])], dim=1)
    joint = tokens.new_zeros(batch, max(lengths), dit.config.hidden_size)
    mask = tokens.new_zeros(batch, max(lengths), dtype=torch.bool)
    for i, (n_caption, n) in enumerate(zip(caption_lengths, lengths)):
        mask[i, :n] = True
        joint[i, :n_caption] = caption[i, :n_caption]
        joint[i, n_caption:n] = tokens[i]
    use_mask = len(set(lengths)) > 1
    for layer in dit.layers:
        joint = layer(joint, mask if use_mask else None, rope, temb)
    joint = dit.norm_out(joint, temb)
    p, channels = dit.config.patch_size, dit.out_channels
    out = [joint[i][n_caption:n].view(height // p, width // p, p, p, channels).permute(4, 0, 2, 1, 3)
           .flatten(3, 4).flatten(1, 2) for i, (n_caption, n) in enumerate(zip(caption_lengths, lengths))]
    return torch.stack(out)
