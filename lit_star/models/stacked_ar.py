"""STAR's stacked autoregressive image generator on top of a frozen Qwen2.5-VL.

Forward graph (the reference's, MM-MVR/STAR ``STARMultiModal.generate_images``):

    text tokens  -> base embed_tokens ---------------------------.
    VQ codes     -> codebook[code] -> generation adapter (MLP) ---+-> frozen base decoder (post-norm hidden)
    ViT features (editing only) ---------------------------------'        |
                                                                  stacked decoder layers + own final norm
                                                                          |
                                                                  pixel head (hidden -> codebook size)

The base never changes: its parameters have ``requires_grad=False`` and it always runs in eval mode,
while gradients still flow *through* it to the adapter. ``base_state_checksum`` fingerprints its
weights so training can prove that at every checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLRotaryEmbedding,
)

from lit_star.models.ar_loss import PixelHead
from lit_star.models.base_vlm import (
    decoder_layers,
    embed_tokens,
    final_norm,
    language_model,
    load_base_vlm,
    text_config,
)

StackInit = Literal["vlm", "llm", "rand"]
STACK_INITS: tuple[str, ...] = ("vlm", "llm", "rand")

# Text-only decoders whose layers have the same parameter names and shapes as Qwen2.5-VL's.
_LLM_INIT_MODEL_TYPES = ("qwen2", "qwen2_5_vl_text", "qwen2_vl_text")


class GenerationAdapter(nn.Module):
    """MLP from codebook vectors to the LLM hidden size: Linear, then (GELU, Linear) x (depth - 1).

    ``layers`` is an ``nn.Sequential`` so parameter names are ``layers.{0,2,4,6}`` like the reference's
    ``pixel_adapter``.
    """

    def __init__(self, codebook_dim: int, hidden_size: int, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"adapter depth must be >= 1, got {depth}")
        modules: list[nn.Module] = [nn.Linear(codebook_dim, hidden_size)]
        for _ in range(depth - 1):
            modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        self.layers = nn.Sequential(*modules)

    @property
    def depth(self) -> int:
        return sum(isinstance(m, nn.Linear) for m in self.layers)

    def forward(self, codebook_vectors: torch.Tensor) -> torch.Tensor:
        return self.layers(codebook_vectors)


def stack_text_config(base_text_config, num_layers: int, rope_theta: float | None = None):
    """The base's text config cut to its last ``num_layers`` layers (what the stack's layers and caches see),
    with the rotary base ``rope_theta`` if given (else the base's)."""
    total = base_text_config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_stack_layers must be in [1, {total}] (the base has {total} layers), got {num_layers}")
    config = copy.deepcopy(base_text_config)
    config.num_hidden_layers = num_layers
    config.layer_types = list(base_text_config.layer_types[total - num_layers :])
    if rope_theta is not None:
        if rope_theta <= 0:
            raise ValueError(f"stack_rope_theta must be > 0, got {rope_theta}")
        config.rope_parameters = {**config.rope_parameters, "rope_theta": float(rope_theta)}
    return config


class StackedDecoder(nn.Module):
    """N Qwen2.5-VL decoder layers, their rotary embedding and a final RMSNorm.

    Parameter names (``layers.{i}.*``, ``norm.weight``) mirror the reference's ``stacked_ar.model``.
    """

    def __init__(self, config, layers: Iterable[nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        if layers is None:
            layers = (Qwen2_5_VLDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layers = nn.ModuleList(layers)
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(f"got {len(self.layers)} layers for a {config.num_hidden_layers}-layer stack config")
        self.norm = Qwen2_5_VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """Same conventions as ``Qwen2_5_VLTextModel.forward``: ``position_ids`` is 3 x B x T (M-RoPE) or
        4 x B x T for packed rows (row 0: per-sample text positions that delimit the packed samples)."""
        if position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4):
            raise ValueError(f"position_ids must be 3 x B x T or 4 x B x T, got {tuple(position_ids.shape)}")
        text_position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
        rope_position_ids = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=text_position_ids,
        )
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(hidden_states, rope_position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_embeddings=position_embeddings,
                position_ids=text_position_ids,
                cache=cache,
                use_cache=use_cache,
            )
        return self.norm(hidden_states)


class StackedAR(nn.Module):
    """Frozen Qwen2.5-VL base + stacked decoder layers + generation adapter + pixel head.

    Args:
        base: a ``Qwen2_5_VLForConditionalGeneration`` (loaded from a local directory or built from a config).
            It is frozen in place.
        num_stack_layers: N, the number of stacked decoder layers (16 for STAR-3B, 14 for STAR-7B).
        adapter_depth: number of Linear layers in the generation adapter (2 for STAR-3B, 4 for STAR-7B).
        codebook_size: number of VQ codes (the pixel head's output size).
        codebook_dim: width of a raw codebook vector (the adapter's input size).
        stack_init: ``vlm`` copies the base's last N layers, ``llm`` copies the last N layers of the text-only
            checkpoint at ``llm_path``, ``rand`` initialises them like a fresh Qwen2.5-VL layer.
        llm_path: local Hugging Face directory of a text-only model with the base's layer architecture
            (only with ``stack_init="llm"``).
        dtype: dtype of the trainable modules (stack, adapter, head). Defaults to torch's default dtype, so a
            bf16 base still gets fp32 master weights to train.
        stack_rope_theta: rotary base of the stack's layers (default: the base's). A small base theta (the
            Shapes base uses 1000 so its 3 x 3 vision grid gets usable rotations) leaves few frequencies slow
            enough to find the prompt from hundreds of image tokens away.
    """

    def __init__(
        self,
        base: Qwen2_5_VLForConditionalGeneration,
        num_stack_layers: int,
        adapter_depth: int,
        codebook_size: int = 65536,
        codebook_dim: int = 512,
        stack_init: StackInit = "vlm",
        llm_path: str | Path | None = None,
        dtype: torch.dtype | None = None,
        stack_rope_theta: float | None = None,
    ) -> None:
        super().__init__()
        if stack_init not in STACK_INITS:
            raise ValueError(f"stack_init must be one of {STACK_INITS}, got {stack_init!r}")
        if (stack_init == "llm") != (llm_path is not None):
            raise ValueError("llm_path is required with stack_init='llm' and only allowed with it")
        self.base = base
        self.base.requires_grad_(False)
        self.base.eval()
        self.stack_init = stack_init
        dtype = dtype or torch.get_default_dtype()
        device = final_norm(base).weight.device
        config = stack_text_config(text_config(base), num_stack_layers, stack_rope_theta)
        layers = self._vlm_layer_copies(num_stack_layers) if stack_init == "vlm" else None
        self.stack = StackedDecoder(config, layers).to(device=device, dtype=dtype)
        self.stack.norm.load_state_dict(final_norm(base).state_dict())
        self.stack.requires_grad_(True)
        if stack_init == "llm":
            self._copy_layers_from_llm(Path(llm_path))
        elif stack_init == "rand":
            self.stack.layers.apply(self.base._init_weights)
        hidden_size = config.hidden_size
        self.adapter = GenerationAdapter(codebook_dim, hidden_size, adapter_depth).to(device=device, dtype=dtype)
        self.pixel_head = PixelHead(hidden_size, codebook_size, device=device, dtype=dtype)

    # -- construction ------------------------------------------------------------------------------

    def _vlm_layer_copies(self, n: int) -> list[nn.Module]:
        base_layers = decoder_layers(self.base)
        copies = []
        for i, source in enumerate(base_layers[len(base_layers) - n :]):
            layer = copy.deepcopy(source)
            layer.self_attn.layer_idx = i  # index into the stack's own KV cache
            copies.append(layer)
        return copies

    def _copy_layers_from_llm(self, llm_path: Path) -> None:
        if not (llm_path / "config.json").is_file():
            raise FileNotFoundError(f"stack_init='llm': no config.json in {llm_path}")
        llm_config = AutoConfig.from_pretrained(llm_path)
        if llm_config.model_type not in _LLM_INIT_MODEL_TYPES:
            raise ValueError(
                f"stack_init='llm': {llm_path} holds a {llm_config.model_type!r} model; "
                f"expected one of {_LLM_INIT_MODEL_TYPES} (same decoder layer as Qwen2.5-VL)"
            )
        ours = self.stack.config
        for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(llm_config, field) != getattr(ours, field):
                raise ValueError(
                    f"stack_init='llm': {llm_path} has {field}={getattr(llm_config, field)}, "
                    f"the base has {getattr(ours, field)}"
                )
        n = len(self.stack.layers)
        if llm_config.num_hidden_layers < n:
            raise ValueError(f"stack_init='llm': {llm_path} has {llm_config.num_hidden_layers} layers, need {n}")
        llm = AutoModelForCausalLM.from_pretrained(llm_path)
        source_layers = llm.model.layers[len(llm.model.layers) - n :]
        for layer, source in zip(self.stack.layers, source_layers):
            layer.load_state_dict(source.state_dict(), strict=True)

    # -- structure ---------------------------------------------------------------------------------

    @property
    def base_decoder(self):
        """The base's text decoder (``Qwen2_5_VLTextModel``)."""
        return language_model(self.base)

    @property
    def num_stack_layers(self) -> int:
        return len(self.stack.layers)

    @property
    def codebook_size(self) -> int:
        return self.pixel_head.out_features

    @property
    def codebook_dim(self) -> int:
        return self.adapter.layers[0].in_features

    @property
    def stack_rope_theta(self) -> float:
        return float(self.stack.config.rope_parameters["rope_theta"])

    def train(self, mode: bool = True) -> StackedAR:
        super().train(mode)
        self.base.eval()  # frozen: dropout and any train-only behaviour stay off
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of everything but the frozen base (stack, adapter, pixel head)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict inverse of :meth:`trainable_state_dict`; names every missing or unexpected key."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing={missing} unexpected={unexpected}")
        self.load_state_dict(dict(state), strict=False)

    def new_caches(self) -> tuple[DynamicCache, DynamicCache]:
        """Empty KV caches for (base decoder, stack), for incremental decoding."""
        return DynamicCache(config=text_config(self.base)), DynamicCache(config=self.stack.config)

    # -- forward -----------------------------------------------------------------------------------

    def embed_codes(self, codebook_vectors: torch.Tensor) -> torch.Tensor:
        """Input embedding of image tokens: ``adapter(codebook[code])`` (pass the raw codebook vectors)."""
        return self.adapter(codebook_vectors.to(self.adapter.layers[0].weight.dtype))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        code_mask: torch.Tensor,
        code_vectors: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings of a laid-out batch (see :mod:`lit_star.models.sequence_layout`).

        Args:
            input_ids: B x T token ids; VQ positions hold ``<|vision_pad|>``, ViT positions ``<|image_pad|>``.
            code_mask: B x T bool, True where a VQ code is the input.
            code_vectors: (code_mask.sum(), codebook_dim) raw codebook vectors of those codes, row-major order.
            pixel_values, image_grid_thw: the ViT inputs of the ``<|image_pad|>`` positions (editing).
        """
        embeds = embed_tokens(self.base)(input_ids)
        if pixel_values is not None:
            image_features = self.base.model.get_image_features(pixel_values, image_grid_thw).pooler_output
            image_features = torch.cat(image_features).to(embeds.dtype)
            image_mask = input_ids == self.base.config.image_token_id
            if int(image_mask.sum()) != image_features.shape[0]:
                raise ValueError(
                    f"{int(image_mask.sum())} <|image_pad|> positions but the ViT returned {image_features.shape[0]}"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        if int(code_mask.sum()) != code_vectors.shape[0]:
            raise ValueError(f"{int(code_mask.sum())} code positions but {code_vectors.shape[0]} code vectors")
        code_embeds = self.embed_codes(code_vectors).to(embeds.dtype)
        # out of place: the frozen embedding output has no grad, the adapter's rows carry it
        return embeds.index_put((code_mask,), code_embeds)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        caches: tuple[Cache, Cache] | None = None,
    ) -> torch.Tensor:
        """Stack output (post-norm hidden states, B x T x hidden); see :meth:`logits` and :meth:`image_token_loss`.

        ``position_ids`` (3 x B x T, or 4 x B x T for packed rows) go to both the base and the stack, as in the
        reference's editing path; for text-to-image they are plain 1-D positions, which is what the reference
        gets by passing none. ``attention_mask`` is the B x T padding mask (None for packed or unpadded rows).
        """
        base_cache, stack_cache = caches if caches is not None else (None, None)
        use_cache = caches is not None
        hidden = self.base_decoder(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=base_cache,
            use_cache=use_cache,
        ).last_hidden_state  # post final norm, as the reference's `outputs[0]`
        hidden = hidden.to(self.stack.norm.weight.dtype)
        return self.stack(hidden, position_ids, attention_mask, cache=stack_cache, use_cache=use_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pixel-head logits over the codebook for stack output ``hidden`` (... x hidden)."""
        return self.pixel_head(hidden)

    def image_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-code cross-entropy over labelled positions, in chunks (see :mod:`lit_star.models.ar_loss`)."""
        return self.pixel_head(hidden, labels)


def base_state_checksum(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (or a module's), in sorted key order.

    Sharded (DTensor) entries are gathered first, so every rank must call it together under FSDP.
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


STACKED_AR_WEIGHTS = "stacked_ar.safetensors"
STACKED_AR_CONFIG = "stacked_ar.json"


def save_stacked_ar(model: StackedAR, directory: str | Path, base_path: str | Path) -> Path:
    """Write the trainable state (``stacked_ar.safetensors``) and how to rebuild it (``stacked_ar.json``:
    sizes, the base directory, the base's dtype and checksum). The frozen base itself is not copied."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, str(directory / STACKED_AR_WEIGHTS))
    config = {
        "num_stack_layers": model.num_stack_layers,
        "adapter_depth": model.adapter.depth,
        "codebook_size": model.codebook_size,
        "codebook_dim": model.codebook_dim,
        "stack_init": model.stack_init,
        "stack_rope_theta": model.stack_rope_theta,
        "base_path": str(Path(base_path).resolve()),
        "base_dtype": str(final_norm(model.base).weight.dtype).removeprefix("torch."),
        "base_checksum": base_state_checksum(model.base),
    }
    (directory / STACKED_AR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_stacked_ar(directory: str | Path, base_path: str | Path | None = None) -> StackedAR:
    """Rebuild a :func:`save_stacked_ar` directory on its base (``base_path`` overrides the recorded one).

    The base's checksum must equal the recorded one: a different base would silently change every output.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file = directory / STACKED_AR_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found (write it with save_stacked_ar)")
    config = json.loads(config_file.read_text())
    base = load_base_vlm(base_path or config["base_path"], dtype=config["base_dtype"])
    checksum = base_state_checksum(base)
    if checksum != config["base_checksum"]:
        raise ValueError(
            f"base at {base_path or config['base_path']} has checksum {checksum[:16]}..., "
            f"{directory} was saved on {config['base_checksum'][:16]}...: not the same base weights"
        )
    # vlm init only to build the right structure cheaply; every trainable weight is overwritten below.
    model = StackedAR(
        base,
        num_stack_layers=config["num_stack_layers"],
        adapter_depth=config["adapter_depth"],
        codebook_size=config["codebook_size"],
        codebook_dim=config["codebook_dim"],
        stack_rope_theta=config.get("stack_rope_theta"),
    )
    model.stack_init = config["stack_init"]
    model.load_trainable_state_dict(load_file(str(directory / STACKED_AR_WEIGHTS)))
    return model
