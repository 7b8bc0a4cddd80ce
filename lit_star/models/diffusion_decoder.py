"""Stage 3's diffusion decoder: a Lumina-Image-2.0 DiT that turns STAR's VQ embeddings into pixels.

Parts (all from diffusers / transformers, nothing re-implemented):

* ``transformer``: :class:`ConditionedLumina2`, the stock ``Lumina2Transformer2DModel`` plus the reference's
  ``ori_inp_refiner`` (Linear, GELU(tanh), zero-initialised Linear without bias) attached by a forward hook
  on ``noise_refiner[-1]``: the condition tokens (the source-latent half of the image tokens) are *replaced*
  by the refiner's output, with no residual. Its keys are the reference's, so reference weights load strictly.
* ``vae``: ``AutoencoderKL`` (latent = (x - shift) * scale), or ``None`` for pixel space (the Shapes world);
* ``text_encoder``: ``Gemma2Model``; the prompt embedding is its second-to-last hidden state, right-padded to
  ``max_caption_tokens`` (256), with the reference's system prompt; the negative prompt is "" alone;
* the scheduler (``FlowMatchEulerDiscreteScheduler``) is built by :func:`build_scheduler`.

Conditioning modes (paper Table 7b; ``DecoderConfig.conditioning``):

* ``channel`` (the reference): the codebook vectors (B, h*w, D) become an h x w grid, resized bilinearly
  (``align_corners=False``) to the latent grid and concatenated to the noisy latent along channels; that is
  concatenated along height with [source latent (zeros for text-to-image), the same VQ map]; only the top
  half of the prediction is kept. ``in_channels`` = latent channels + D.
* ``sequence``: the VQ map, pooled to the DiT's patch grid and projected (``vq_projection``) to the hidden
  size, is appended to the image tokens after the noise refiner (as extra rows below the source latent).
* ``text``: the VQ vectors, projected to the caption feature size, are appended to the caption tokens
  (right after each caption's last real token, so Lumina's per-sample caption lengths stay right).

Initialising from a Lumina-Image-2.0 directory widens ``x_embedder`` (:func:`widen_x_embedder`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel

ConditioningMode = Literal["channel", "sequence", "text"]
CONDITIONING_MODES = ("channel", "sequence", "text")
EmbedderInit = Literal["scatter", "reference"]
EMBEDDER_INITS = ("scatter", "reference")

# The text of the reference (diffusers' Lumina2Pipeline.system_prompt, used by MM-MVR/STAR unchanged).
LUMINA2_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)
PROMPT_SEPARATOR = " <Prompt Start> "

# Lumina-Image-2.0's DiT (NOTES section 2; cap_feat_dim is Gemma-2-2B's hidden size).
LUMINA2_DIT = dict(
    patch_size=2, hidden_size=2304, num_layers=26, num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8,
    multiple_of=256, norm_eps=1e-5, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=2304,
)
DIT_FLAVOURS: dict[str, dict[str, Any]] = {
    "lumina2": LUMINA2_DIT,
    # A mid-size DiT for benchmarks (131M parameters).
    "mid": dict(patch_size=2, hidden_size=768, num_layers=8, num_refiner_layers=2, num_attention_heads=12,
                num_kv_heads=4, multiple_of=256, norm_eps=1e-5, axes_dim_rope=(16, 24, 24),
                axes_lens=(300, 512, 512), cap_feat_dim=768),
    "tiny": dict(patch_size=2, hidden_size=48, num_layers=2, num_refiner_layers=1, num_attention_heads=3,
                 num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 6, 6),
                 axes_lens=(300, 64, 64), cap_feat_dim=32),
}


class ConfigError(ValueError):
    """A stage 3 configuration that cannot work; raised before any weights load."""


@dataclass
class DecoderConfig:
    """What rebuilds a :class:`DiffusionDecoder` (saved as ``decoder.json`` beside its weights).

    ``transformer`` is the stock DiT config without ``in_channels`` / ``out_channels`` (derived here from
    ``latent_channels``, ``codebook_dim`` and ``conditioning``).
    """

    transformer: dict[str, Any]
    latent_channels: int = 16
    codebook_dim: int = 512
    conditioning: ConditioningMode = "channel"
    max_caption_tokens: int = 256
    system_prompt: str | None = LUMINA2_SYSTEM_PROMPT
    vae_shift: float = 0.0
    vae_scale: float = 1.0
    latent_downsample: int = 8  # pixels per latent cell (1 in pixel space)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONING_MODES:
            raise ConfigError(f"conditioning must be one of {list(CONDITIONING_MODES)}, got {self.conditioning!r}")
        bad = sorted({"in_channels", "out_channels"} & set(self.transformer))
        if bad:
            raise ConfigError(f"transformer config must not set {bad}: they follow from latent_channels, "
                              "codebook_dim and conditioning")

    @property
    def in_channels(self) -> int:
        return self.latent_channels + (self.codebook_dim if self.conditioning == "channel" else 0)

    def dit_config(self) -> dict[str, Any]:
        # out_channels explicitly: the reference's saved config has None, which would size norm_out for 528.
        return dict(self.transformer, in_channels=self.in_channels, out_channels=self.latent_channels)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["transformer"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.transformer.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecoderConfig:
        return cls(**values)


class ConditionedLumina2(Lumina2Transformer2DModel):
    """``Lumina2Transformer2DModel`` with the reference's ``ori_inp_refiner`` and an appended-token slot.

    Called without ``condition_tokens`` it computes exactly the stock forward (the refiner does not run).
    With ``condition_tokens=(start, end)`` the image tokens ``[start, end)`` leaving ``noise_refiner`` are
    replaced by ``ori_inp_refiner`` of themselves; ``appended`` (B, N, hidden) then replaces the last N
    image tokens (the ``sequence`` conditioning mode).
    """

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        width = self.config.hidden_size
        self.ori_inp_refiner = nn.Sequential(
            nn.Linear(width, width), nn.GELU(approximate="tanh"), nn.Linear(width, width, bias=False)
        )
        nn.init.zeros_(self.ori_inp_refiner[2].weight)
        self._condition_tokens: tuple[int, int] | None = None
        self._appended: torch.Tensor | None = None
        self.noise_refiner[-1].register_forward_hook(self._after_noise_refiner)

    def _after_noise_refiner(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self._condition_tokens is None:
            return output
        start, end = self._condition_tokens
        parts = [output[:, :start], self.ori_inp_refiner(output[:, start:end])]
        if self._appended is not None:
            parts.append(self._appended.to(output.dtype))
        else:
            parts.append(output[:, end:])
        return torch.cat(parts, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        condition_tokens: tuple[int, int] | None = None,
        appended: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        self._condition_tokens, self._appended = condition_tokens, appended
        try:
            return super().forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, **kwargs)
        finally:
            self._condition_tokens, self._appended = None, None


def build_transformer(config: DecoderConfig) -> ConditionedLumina2:
    return ConditionedLumina2(**config.dit_config())


@torch.no_grad()
def widen_x_embedder(
    stock: nn.Linear, in_channels: int, old_channels: int, patch_size: int, mode: EmbedderInit = "scatter"
) -> nn.Linear:
    """A ``x_embedder`` for ``in_channels`` input channels from a stock one for ``old_channels``.

    Lumina patchifies as (py, px, C): input feature ``(py * p + px) * C + c``. ``scatter`` puts each old
    column at its new place ``(py * p + px) * in_channels + c`` and zeros the rest, so with zero extra
    channels the widened DiT computes exactly what the stock one did. ``reference`` copies the old block
    into the first ``p * p * old_channels`` columns as MM-MVR/STAR does (which does not reproduce Lumina).
    """
    if mode not in EMBEDDER_INITS:
        raise ConfigError(f"x_embedder init must be one of {list(EMBEDDER_INITS)}, got {mode!r}")
    p2 = patch_size * patch_size
    if stock.in_features != p2 * old_channels:
        raise ValueError(f"x_embedder has {stock.in_features} inputs, expected {p2} x {old_channels}")
    wide = nn.Linear(p2 * in_channels, stock.out_features, bias=True, dtype=stock.weight.dtype,
                     device=stock.weight.device)
    wide.weight.zero_()
    wide.bias.copy_(stock.bias)
    if mode == "reference":
        wide.weight[:, : p2 * old_channels].copy_(stock.weight)
    else:
        old = stock.weight.view(stock.out_features, p2, old_channels)
        wide.weight.view(stock.out_features, p2, in_channels)[:, :, :old_channels].copy_(old)
    return wide


def transformer_from_lumina(
    stock: Lumina2Transformer2DModel, config: DecoderConfig, embedder_init: EmbedderInit = "scatter"
) -> ConditionedLumina2:
    """Our DiT initialised from a stock Lumina2 model (e.g. Lumina-Image-2.0's ``transformer/``)."""
    if stock.config.in_channels != config.latent_channels:
        raise ConfigError(f"the Lumina2 DiT takes {stock.config.in_channels} channels, latent_channels is "
                          f"{config.latent_channels}")
    ours = build_transformer(config)
    state = {k: v for k, v in stock.state_dict().items() if not k.startswith("x_embedder.")}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    leftover = [k for k in missing if not k.startswith(("x_embedder.", "ori_inp_refiner."))]
    if leftover or unexpected:
        raise KeyError(f"Lumina2 weights do not fit: missing {leftover[:10]}, unexpected {unexpected[:10]}")
    ours.x_embedder = widen_x_embedder(stock.x_embedder, config.in_channels, config.latent_channels,
                                       stock.config.patch_size, embedder_init)
    return ours


def build_scheduler(shift: float = 1.0, **overrides: Any) -> FlowMatchEulerDiscreteScheduler:
    overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}
    overrides.setdefault("num_train_timesteps", 1000)
    return FlowMatchEulerDiscreteScheduler(shift=shift, **overrides)


def tiny_text_encoder(hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A byte-level tokenizer and a randomly initialised (seeded, so reproducible) tiny ``Gemma2Model``."""
    from transformers import Gemma2Config, Gemma2Model

    from lit_star.models.tokenizer import train_qwen2_tokenizer

    tokenizer = train_qwen2_tokenizer(["abcdefghijklmnopqrstuvwxyz"], vocab_size=257, min_frequency=1)
    tokenizer.padding_side = "right"
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=hidden_size // 2, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512,
        sliding_window=64,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Gemma2Model(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return tokenizer, model.eval()


class Denoiser(nn.Module):
    """The trainable part: the DiT plus, for the ``sequence`` / ``text`` modes, ``vq_projection``.

    ``forward`` is the velocity prediction; under FSDP2 this module is the root of the sharding plan.
    """

    def __init__(self, config: DecoderConfig, transformer: ConditionedLumina2) -> None:
        super().__init__()
        self.config = config
        self.transformer = transformer
        if transformer.config.in_channels != config.in_channels:
            raise ConfigError(f"the DiT takes {transformer.config.in_channels} input channels, the "
                              f"{config.conditioning} mode needs {config.in_channels}")
        hidden = transformer.config.hidden_size
        if config.conditioning == "sequence":
            self.vq_projection = nn.Linear(config.codebook_dim, hidden)
        elif config.conditioning == "text":
            self.vq_projection = nn.Linear(config.codebook_dim, transformer.config.cap_feat_dim)
        else:
            self.vq_projection = None

    def forward(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        vq: torch.Tensor,
        source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The DiT's prediction (x0 - noise) for ``noisy`` (B, C, H, W) at DiT ``timestep`` (1 - t/1000).

        ``vq`` is the VQ map (B, D, H, W) of :func:`vq_map` (zeros for "no VQ"); ``source`` the source
        latent (``None`` or zeros for text-to-image).
        """
        b, c, h, w = noisy.shape
        if source is None:
            source = torch.zeros_like(noisy)
        vq = vq.to(noisy.dtype)
        p = self.transformer.config.patch_size
        tokens = (h // p) * (w // p)
        condition = (tokens, 2 * tokens)  # the source rows: replaced by ori_inp_refiner after noise_refiner
        appended = None
        mode = self.config.conditioning
        if mode == "channel":
            canvas = torch.cat([torch.cat([noisy, vq], 1), torch.cat([source, vq], 1)], dim=2)
        elif mode == "sequence":
            canvas = torch.cat([noisy, source, torch.zeros_like(noisy)], dim=2)
            pooled = F.avg_pool2d(vq, p) if p > 1 else vq
            appended = self.vq_projection(pooled.flatten(2).transpose(1, 2))
        else:
            canvas = torch.cat([noisy, source], dim=2)
            pooled = F.avg_pool2d(vq, p) if p > 1 else vq
            extra = self.vq_projection(pooled.flatten(2).transpose(1, 2))
            prompt_embeds, prompt_mask = insert_after_caption(prompt_embeds.to(extra.dtype), prompt_mask, extra)
        out = self.transformer(canvas, timestep, prompt_embeds, prompt_mask, condition_tokens=condition,
                               appended=appended, return_dict=False)[0]
        return out[:, :, :h]


def vq_map(code_vectors: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) or (B, h, w, D) codebook vectors -> (B, D, H, W), bilinear, ``align_corners=False``."""
    if code_vectors.ndim == 3:
        b, n, d = code_vectors.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} code vectors do not form a square grid; pass (B, h, w, D)")
        code_vectors = code_vectors.view(b, side, side, d)
    grid = code_vectors.permute(0, 3, 1, 2).contiguous()
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)


class DiffusionDecoder(nn.Module):
    """The stage 3 decoder: ``denoiser`` (trainable) + ``vae`` and ``text_encoder`` (frozen) + tokenizer.

    State-dict names: ``denoiser.transformer.*`` (the reference's ``transformer.*``), ``vae.*``,
    ``text_encoder.*`` (the reference's ``text_encoder_one.*``) and ``denoiser.vq_projection.*``.
    """

    def __init__(self, denoiser: Denoiser, text_encoder: nn.Module, tokenizer: Any,
                 vae: AutoencoderKL | None = None) -> None:
        super().__init__()
        self.config = denoiser.config
        self.denoiser = denoiser
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if vae is not None and vae.config.latent_channels != self.config.latent_channels:
            raise ConfigError(f"the VAE has {vae.config.latent_channels} latent channels, the config "
                              f"{self.config.latent_channels}")

    @property
    def transformer(self) -> ConditionedLumina2:
        return self.denoiser.transformer

    def frozen_modules(self) -> dict[str, nn.Module]:
        parts = {"text_encoder": self.text_encoder}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], system_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, F) second-to-last hidden states and (B, L) mask; right-padded to ``max_caption_tokens``."""
        if system_prompt and self.config.system_prompt is not None:
            prompts = [self.config.system_prompt + PROMPT_SEPARATOR + p for p in prompts]
        self.tokenizer.padding_side = "right"
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.config.max_caption_tokens,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        out = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2], mask

    def negative_prompt(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's unconditional caption: "" without the system prompt."""
        embeds, mask = self.encode_prompts([""], system_prompt=False)
        return embeds.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[-1, 1] images -> latents ((x - shift) * scale of a VAE sample; the pixels in pixel space)."""
        if self.vae is None:
            return images
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        return (latents - self.config.vae_shift) * self.config.vae_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        latents = latents / self.config.vae_scale + self.config.vae_shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    def velocity(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.denoiser(*args, **kwargs)


def insert_after_caption(embeds: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``extra`` (B, N, F) right after each row's real caption tokens (mask 1), padding after it.

    Lumina takes each row's first ``mask.sum()`` caption tokens, so appending after the padding would drop them.
    """
    b, length, features = embeds.shape
    n = extra.shape[1]
    lengths = mask.sum(1).long()
    positions = torch.arange(length + n, device=embeds.device).unsqueeze(0).expand(b, -1)
    out = embeds.new_zeros(b, length + n, features)
    in_caption = positions < lengths[:, None]
    in_extra = (positions >= lengths[:, None]) & (positions < (lengths + n)[:, None])
    out[in_caption] = embeds[mask.bool()]
    out[in_extra] = extra.reshape(b * n, features)
    new_mask = (in_caption | in_extra).to(mask.dtype)
    return out, new_mask


# ---- flow matching (the reference's rectified-flow objective) -------------------------------------

def sample_training_sigmas(
    train_sigmas: torch.Tensor,
    train_timesteps: torch.Tensor,
    batch_size: int,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and t from the scheduler's training table at ⌊u·1000⌋, u from diffusers' density sampler."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=batch_size, logit_mean=logit_mean, logit_std=logit_std,
        mode_scale=mode_scale, generator=generator,
    )
    indices = (u * len(train_timesteps)).long().clamp(max=len(train_timesteps) - 1)
    return train_sigmas[indices], train_timesteps[indices]


def flow_matching_loss(
    prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
) -> torch.Tensor:
    """mean(w(σ) (prediction - (x0 - ε))²) with w from diffusers' ``compute_loss_weighting_for_sd3``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = latents - noise
    per_sample = (weighting.float() * (prediction.float() - target.float()) ** 2).flatten(1).mean(1)
    return per_sample.mean()


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = σ ε + (1 - σ) x0."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return sigmas * noise + (1 - sigmas) * latents


@dataclass
class DropoutMasks:
    """Per-sample InstructPix2Pix conditioning dropout: True means "replace / zero this condition"."""

    prompt: torch.Tensor
    vq: torch.Tensor
    source: torch.Tensor


def conditioning_dropout(p: torch.Tensor, uncondition_prob: float, vq_drop_prob: float,
                         is_edit: torch.Tensor | bool = False) -> DropoutMasks:
    """From uniform draws ``p`` (B,): prompt -> "" if p < 2u; VQ zeroed if p <= p_drop (always for edits);
    source latent zeroed if u <= p < 3u (the reference's ``Lumina2Decoder.forward``)."""
    u = uncondition_prob
    edit = torch.as_tensor(is_edit, device=p.device).expand_as(p)
    return DropoutMasks(prompt=p < 2 * u, vq=(p <= vq_drop_prob) | edit, source=(p >= u) & (p < 3 * u))


# ---- saving ---------------------------------------------------------------------------------------

DECODER_CONFIG_FILE = "decoder.json"
DECODER_WEIGHTS_FILE = "decoder.safetensors"


def save_decoder_config(config: DecoderConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DECODER_CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


# ---- the reference layout (MM-MVR/STAR ``diffusion_decoder.*``) -----------------------------------

# (reference prefix under ``diffusion_decoder.``, our prefix inside DiffusionDecoder)
REFERENCE_DECODER_PREFIXES: tuple[tuple[str, str], ...] = (
    ("transformer.", "denoiser.transformer."),
    ("vae.", "vae."),
    ("text_encoder_one.", "text_encoder."),
)


def decoder_reference_key_to_ours(key: str) -> str | None:
    for reference, ours in REFERENCE_DECODER_PREFIXES:
        if key.startswith(reference):
            return ours + key[len(reference):]
    return None


def decoder_key_to_reference(key: str) -> str | None:
    for reference, ours in REFERENCE_DECODER_PREFIXES:
        if key.startswith(ours):
            return reference + key[len(ours):]
    return None


def reference_decoder_state_dict(decoder: DiffusionDecoder) -> dict[str, torch.Tensor]:
    """Our decoder in the reference layout (keys without the ``diffusion_decoder.`` prefix)."""
    state, unplaced = {}, []
    for key, value in decoder.state_dict().items():
        reference = decoder_key_to_reference(key)
        if reference is None:
            unplaced.append(key)
        else:
            state[reference] = value.detach().clone()
    if unplaced:
        raise KeyError(f"the reference layout has no place for {unplaced[:10]} ({decoder.config.conditioning} "
                       "conditioning); only channel-conditioned decoders export to it")
    return state


def load_reference_decoder_state(decoder: DiffusionDecoder, state: dict[str, torch.Tensor], source: str) -> int:
    """Load reference-layout ``state`` (prefix stripped) strictly: every key of both sides must match."""
    mapped, unknown = {}, []
    for key, value in state.items():
        ours = decoder_reference_key_to_ours(key)
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = value
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(unknown + [k for k in mapped if k not in expected])
    shapes = sorted(k for k in mapped if k in expected and tuple(mapped[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        raise KeyError(
            f"{source}: diffusion_decoder keys do not match the decoder: "
            f"missing {[decoder_key_to_reference(k) or k for k in missing][:20]}, unexpected {unexpected[:20]}, "
            f"shape mismatch {[(k, tuple(mapped[k].shape), tuple(expected[k].shape)) for k in shapes][:10]}"
        )
    decoder.load_state_dict(mapped, strict=True)
    return len(mapped)


def save_decoder(decoder: DiffusionDecoder, directory: str | Path, scheduler_config: dict | None = None) -> Path:
    """``decoder.json`` + ``decoder.safetensors`` (every part) + the tokenizer + ``scheduler.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_decoder_config(decoder.config, directory)
    meta = {"has_vae": decoder.vae is not None,
            "vae_config": dict(decoder.vae.config) if decoder.vae is not None else None,
            "text_encoder_config": decoder.text_encoder.config.to_dict(),
            "scheduler": {k: v for k, v in (scheduler_config or {}).items() if not k.startswith("_")}}
    (directory / "parts.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
    save_file({k: v.detach().contiguous() for k, v in decoder.state_dict().items()},
              str(directory / DECODER_WEIGHTS_FILE))
    decoder.tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def load_decoder(directory: str | Path, map_location: str = "cpu"):
    """(DiffusionDecoder, scheduler) written by :func:`save_decoder`; loads strictly."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    directory = Path(directory)
    for name in (DECODER_CONFIG_FILE, "parts.json", DECODER_WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a saved diffusion decoder directory")
    config = DecoderConfig.from_dict(json.loads((directory / DECODER_CONFIG_FILE).read_text()))
    meta = json.loads((directory / "parts.json").read_text())
    vae = AutoencoderKL.from_config(meta["vae_config"]) if meta["has_vae"] else None
    text_config = {k: v for k, v in meta["text_encoder_config"].items() if k not in ("architectures",)}
    text_encoder = Gemma2Model(Gemma2Config.from_dict(text_config))
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
    decoder = DiffusionDecoder(Denoiser(config, build_transformer(config)), text_encoder, tokenizer, vae)
    decoder.load_state_dict(load_file(str(directory / DECODER_WEIGHTS_FILE), device=map_location), strict=True)
    return decoder.eval(), build_scheduler(**meta["scheduler"]) if meta["scheduler"] else build_scheduler()
