"""The released STAR checkpoint layout (MM-MVR/STAR, transformers 4.51) and our module names.

A released ``STAR-3B.pt`` / ``STAR-7B.pt`` is ``torch.load(f)['state_dict']`` with top-level groups:

    llm.model.*            -> base.model.language_model.*   (transformers 5 moved the text decoder)
    llm.visual.*           -> base.model.visual.*
    llm.lm_head.*          -> base.lm_head.*
    stacked_ar.model.layers.* / stacked_ar.model.norm.*  -> stack.layers.* / stack.norm.*
    pixel_adapter.*        -> adapter.*
    pixel_output_head.*    -> pixel_head.*
    pixel_encoder.*        -> the VQ (:class:`lit_star.models.vq.VQModel`, reference key names)
    diffusion_decoder.*    -> the diffusion decoder (kept aside, reported separately)

The reference loads with ``strict=False``; here every key must be accounted for, and a mismatch raises
an error that names the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lit_star.models.stacked_ar import StackedAR

# (reference prefix, our prefix inside StackedAR); order matters only for readability, prefixes are disjoint.
STACKED_AR_PREFIXES: tuple[tuple[str, str], ...] = (
    ("llm.model.", "base.model.language_model."),
    ("llm.visual.", "base.model.visual."),
    ("llm.lm_head.", "base.lm_head."),
    ("stacked_ar.model.layers.", "stack.layers."),
    ("stacked_ar.model.norm.", "stack.norm."),
    ("pixel_adapter.", "adapter."),
    ("pixel_output_head.", "pixel_head."),
)
VQ_PREFIX = "pixel_encoder."
DIFFUSION_DECODER_PREFIX = "diffusion_decoder."
REFERENCE_GROUPS = ("llm", "stacked_ar", "pixel_adapter", "pixel_output_head", "pixel_encoder", "diffusion_decoder")


class KeyMismatchError(KeyError):
    """Raised when a checkpoint and a model disagree on keys or shapes; the message names them."""

    def __str__(self) -> str:  # KeyError would print the message repr'd on one line
        return str(self.args[0])


@dataclass
class KeyCoverage:
    """How the keys of a checkpoint group cover a model's state dict."""

    group: str
    expected: int
    matched: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)

    def raise_if_incomplete(self) -> None:
        if self.complete:
            return
        lines = [f"{self.group}: {self.matched}/{self.expected} keys matched"]
        problems = (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.mis_shaped))
        for label, keys in problems:
            if keys:
                lines.append(f"  {label} ({len(keys)}): {keys[:20]}{' ...' if len(keys) > 20 else ''}")
        raise KeyMismatchError("\n".join(lines))

    def as_dict(self) -> dict:
        return {
            "expected": self.expected,
            "matched": self.matched,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mis_shaped": self.mis_shaped,
        }


def reference_group(key: str) -> str:
    return key.split(".", 1)[0]


def reference_key_to_ours(key: str) -> str | None:
    """Our StackedAR parameter name for a reference key, or None if the key is not StackedAR's."""
    for reference_prefix, our_prefix in STACKED_AR_PREFIXES:
        if key.startswith(reference_prefix):
            return our_prefix + key[len(reference_prefix) :]
    return None


def our_key_to_reference(key: str) -> str:
    for reference_prefix, our_prefix in STACKED_AR_PREFIXES:
        if key.startswith(our_prefix):
            return reference_prefix + key[len(our_prefix) :]
    raise KeyError(f"{key!r} has no place in the reference layout")


@dataclass
class ReferenceParts:
    """A reference state dict split by destination (keys already in the destination's naming)."""

    stacked_ar: dict[str, torch.Tensor]
    vq: dict[str, torch.Tensor]
    diffusion_decoder: dict[str, torch.Tensor]


def split_reference_state_dict(state: Mapping[str, torch.Tensor]) -> ReferenceParts:
    """Route every reference key to StackedAR / VQ / diffusion decoder; unknown top-level groups raise."""
    parts = ReferenceParts({}, {}, {})
    unknown = []
    for key, value in state.items():
        ours = reference_key_to_ours(key)
        if ours is not None:
            parts.stacked_ar[ours] = value
        elif key.startswith(VQ_PREFIX):
            parts.vq[key[len(VQ_PREFIX) :]] = value
        elif key.startswith(DIFFUSION_DECODER_PREFIX):
            parts.diffusion_decoder[key[len(DIFFUSION_DECODER_PREFIX) :]] = value
        else:
            unknown.append(key)
    if unknown:
        groups = sorted({reference_group(k) for k in unknown})
        raise KeyMismatchError(
            f"{len(unknown)} keys outside the reference layout (groups {groups}, expected {list(REFERENCE_GROUPS)}): "
            f"{sorted(unknown)[:20]}"
        )
    return parts


@dataclass(frozen=True)
class StackShape:
    num_stack_layers: int
    adapter_depth: int
    codebook_size: int
    codebook_dim: int


def infer_stack_shape(state: Mapping[str, torch.Tensor]) -> StackShape:
    """N, adapter depth and codebook size/width read off a reference state dict."""
    layer_ids = {int(k.split(".")[3]) for k in state if k.startswith("stacked_ar.model.layers.")}
    adapter_linears = sorted({int(k.split(".")[2]) for k in state if k.startswith("pixel_adapter.layers.")})
    for name, found in (("stacked_ar.model.layers.*", layer_ids), ("pixel_adapter.layers.*", adapter_linears)):
        if not found:
            raise KeyMismatchError(f"reference checkpoint has no {name} keys")
    if layer_ids != set(range(len(layer_ids))):
        raise KeyMismatchError(f"stacked_ar layer indices are not 0..N-1: {sorted(layer_ids)}")
    if adapter_linears != list(range(0, 2 * len(adapter_linears), 2)):
        raise KeyMismatchError(f"pixel_adapter Linear indices {adapter_linears} are not 0, 2, 4, ... (Linear/GELU)")
    for key in ("pixel_output_head.weight", "pixel_adapter.layers.0.weight"):
        if key not in state:
            raise KeyMismatchError(f"reference checkpoint has no {key}")
    return StackShape(
        num_stack_layers=len(layer_ids),
        adapter_depth=len(adapter_linears),
        codebook_size=state["pixel_output_head.weight"].shape[0],
        codebook_dim=state["pixel_adapter.layers.0.weight"].shape[1],
    )


def _tied_twins(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Alias key -> the earlier key whose storage it shares (e.g. a tied ``lm_head.weight``)."""
    first: dict[tuple, str] = {}
    twins = {}
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in first:
            twins[key] = first[identity]
        else:
            first[identity] = key
    return twins


def stacked_ar_coverage(model: StackedAR, mapped: Mapping[str, torch.Tensor]) -> KeyCoverage:
    """Coverage of ``model.state_dict()`` by ``mapped`` (our key names), reported in reference key names.

    A tied alias (same storage as another key) may be absent; if present it must equal its twin.
    """
    own = model.state_dict()
    twins = _tied_twins(own)
    mis_shaped = sorted(
        f"{our_key_to_reference(k)}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    for alias, twin in twins.items():
        if alias in mapped and twin in mapped and not torch.equal(mapped[alias], mapped[twin]):
            mis_shaped.append(f"{our_key_to_reference(alias)}: tied to {our_key_to_reference(twin)} but differs")
    return KeyCoverage(
        group="stacked_ar",
        expected=len(own) - len(twins),
        matched=sum(1 for k in mapped if k in own and k not in twins),
        missing=sorted(our_key_to_reference(k) for k in own if k not in mapped and k not in twins),
        unexpected=sorted(our_key_to_reference(k) for k in mapped if k not in own),
        mis_shaped=mis_shaped,
    )


def base_differences(model: StackedAR, mapped: Mapping[str, torch.Tensor]) -> list[str]:
    """Reference ``llm.*`` keys whose values differ from the base currently in ``model`` (compared in the
    checkpoint's dtype). Empty when the checkpoint was trained on exactly this base."""
    own = model.state_dict()
    return sorted(
        our_key_to_reference(k)
        for k, v in mapped.items()
        if k.startswith("base.") and not torch.equal(own[k].to(v.dtype), v)
    )


@torch.no_grad()
def load_reference_into(model: StackedAR, mapped: Mapping[str, torch.Tensor]) -> KeyCoverage:
    """Load StackedAR's part of a split reference checkpoint (our key names) into ``model``, strictly."""
    coverage = stacked_ar_coverage(model, mapped)
    coverage.raise_if_incomplete()
    result = model.load_state_dict(dict(mapped), strict=False)
    twins = _tied_twins(model.state_dict())
    leftover = [k for k in result.missing_keys if k not in twins] + list(result.unexpected_keys)
    if leftover:  # unreachable unless coverage and load_state_dict disagree; never load partially silently
        raise KeyMismatchError(f"load_state_dict left keys unmatched: {leftover[:20]}")
    return coverage


def export_reference_state_dict(
    model: StackedAR,
    vq_state: Mapping[str, torch.Tensor] | None = None,
    diffusion_decoder_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Our model (plus the VQ's reference-layout state and a diffusion decoder's) in the released layout;
    ``torch.save({"state_dict": ...}, f)`` gives a file the reference (and ``import-reference``) loads."""
    state = {our_key_to_reference(k): v.detach().clone() for k, v in model.state_dict().items()}
    for prefix, part in ((VQ_PREFIX, vq_state), (DIFFUSION_DECODER_PREFIX, diffusion_decoder_state)):
        for key, value in (part or {}).items():
            state[prefix + key] = value.detach().clone()
    return state
