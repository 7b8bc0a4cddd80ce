"""Loading and saving every stage's weights, with no Lightning module in the way.

* stage 0: :func:`export_base_checkpoint` turns a ``BaseVLMModule`` checkpoint into a Hugging Face directory;
* stage 1: :func:`load_vq` reads a ``VQModule`` checkpoint, a ``VQModel.save_pretrained`` directory or a
  reference ``VQ-Model.pt``; :func:`export_vq` writes the reference layout and/or safetensors, verified;
* stage 2: :func:`load_stage2` reads a ``StackedARModule`` checkpoint (its ``stacked_ar_config`` entry, or
  for checkpoints written before that entry existed, its hyper-parameters) or a ``save_stacked_ar`` directory;
* the released STAR-3B/7B: :func:`import_reference` maps the reference layout with exact key coverage.

Depends on ``lit_star.models`` only; LightningModules, sampling, evals and commands all load through here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lit_star.models.base_vlm import load_base_vlm
from lit_star.models.edit_source import VitPixelLimits
from lit_star.models.reference_format import (
    KeyMismatchError,
    base_differences,
    infer_stack_shape,
    load_reference_into,
    split_reference_state_dict,
    stacked_ar_coverage,
)
from lit_star.models.stacked_ar import (
    STACKED_AR_CONFIG,
    StackedAR,
    base_state_checksum,
    load_stacked_ar,
    save_stacked_ar,
)
from lit_star.models.vq import CONFIG_FILE, WEIGHTS_FILE, VQModel, vq_config

log = logging.getLogger(__name__)

# ---- stage 0 -----------------------------------------------------------------------------------

# Entries a BaseVLMModule checkpoint carries beside its state_dict, so it exports without the world.
BASE_CONFIG_KEY = "base_vlm_config"
BASE_FILES_KEY = "base_vlm_files"


def export_base_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory of a stage 0 Lightning checkpoint (any step, e.g. ``last.ckpt``)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for key in (BASE_CONFIG_KEY, BASE_FILES_KEY, "state_dict"):
        if key not in checkpoint:
            raise KeyError(f"{ckpt_path} has no {key!r}: not a stage 0 (BaseVLMModule) checkpoint")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(checkpoint[BASE_CONFIG_KEY]))
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name, text in checkpoint[BASE_FILES_KEY].items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


# ---- stage 1 -----------------------------------------------------------------------------------

def load_vq(path: str | Path, flavour: str | None = None, map_location: str = "cpu") -> VQModel:
    """A VQ ready for encoding from our Lightning checkpoint, a save_pretrained dir or reference weights."""
    path = Path(path)
    if path.is_file() and flavour is None:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if isinstance(checkpoint, dict) and "hyper_parameters" in checkpoint and "state_dict" in checkpoint:
            return _vq_from_lightning_checkpoint(checkpoint, str(path))
        raise ValueError(
            f"{path} is not a VQModule Lightning checkpoint; for reference-layout weights pass --flavour "
            "(e.g. star-vq)"
        )
    model = VQModel.from_pretrained(path, flavour, map_location=map_location)
    return model.eval()


def _vq_from_lightning_checkpoint(checkpoint: dict, source: str) -> VQModel:
    hparams = checkpoint["hyper_parameters"]
    if "flavour" not in hparams:
        raise KeyError(f"{source}: hyper_parameters have no 'flavour'; not a VQModule checkpoint")
    state = checkpoint["state_dict"]
    prefix = "ema_vq.module." if any(k.startswith("ema_vq.module.") for k in state) else "vq."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise KeyError(f"{source}: no '{prefix}*' weights in its state_dict")
    model = VQModel(vq_config(hparams["flavour"], **(hparams.get("vq_overrides") or {})))
    model.load_state_dict(weights, strict=True)
    log.info("loaded %s weights (%s) from %s", "EMA" if prefix.startswith("ema") else "trained", hparams["flavour"], source)
    # Encoding with a folded codebook gives the same codes and skips the projector on every batch.
    model.fold_codebook_projector()
    return model.eval()


REFERENCE_VQ_FILE = "VQ-Model.pt"
ExportFormat = Literal["reference", "safetensors", "both"]


def export_vq(model: VQModel, out: str | Path, export_format: ExportFormat = "both") -> list[Path]:
    """Write ``model`` as a reference ``VQ-Model.pt`` and/or ``model.safetensors`` + ``config.json``.

    Every written file is reloaded strictly and compared tensor by tensor; returns the written paths.
    """
    if model.config.local_encoder and export_format != "safetensors":
        raise ValueError("this VQ has a local encoder (VQConfig.local_encoder), which the reference code cannot "
                         "build: a VQ-Model.pt would load into a different encoder; export as safetensors")
    state = model.reference_state_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    reloaded: list[tuple[Path, VQModel]] = []
    if export_format in ("reference", "both"):
        target = out / REFERENCE_VQ_FILE
        torch.save(state, target)
        written.append(target)
        reloaded.append((target, VQModel.from_pretrained(target, model.exported_config())))
    if export_format in ("safetensors", "both"):
        model.save_pretrained(out)
        written += [out / WEIGHTS_FILE, out / CONFIG_FILE]
        reloaded.append((out, VQModel.from_pretrained(out)))
    for source, copy in reloaded:
        copy_state = copy.state_dict()
        different = sorted(k for k in state if not torch.equal(state[k], copy_state[k].to(state[k].dtype)))
        if different:
            raise RuntimeError(f"export check failed: {source} reloads with different tensors {different[:10]}")
    return written


# ---- stage 2 -----------------------------------------------------------------------------------

# Entries a StackedARModule checkpoint carries beside its (trainable-only) state_dict.
FROZEN_CHECKSUMS_KEY = "frozen_checksums"
IMAGE_SIZE_KEY = "image_size"
STACKED_AR_CONFIG_KEY = "stacked_ar_config"
STAGE2_STATE_PREFIX = "model.stacked_ar."
# What rebuilds a StackedAR around its base and VQ (the fields of stacked_ar.json that are not derived).
STACKED_AR_FIELDS = ("num_stack_layers", "adapter_depth", "stack_init", "stack_rope_theta", "base_path",
                     "base_dtype", "vq_path", "vq_flavour", "reasoning_suffix")
# What MM-MVR/STAR appends to the base's answer in reasoning mode: its training captions end with it. A stack
# records its own (``reasoning_suffix`` in stacked_ar_config; empty for Shapes); imported STAR weights and
# checkpoints that record none get this one.
REFERENCE_REASONING_SUFFIX = " Ultra HD, 4K, cinematic composition"


class FrozenWeightsChangedError(RuntimeError):
    """Frozen weights (base VLM or VQ) differ from the ones a run or checkpoint was made with."""


@dataclass
class Stage2Weights:
    """A loaded stage 2 model: the stack on its base, its VQ, where the base lives and the trained image size."""

    stacked_ar: StackedAR
    vq: VQModel
    base_path: str
    image_size: int | None
    # appended to the base's answer in reasoning mode: what the stack's training captions end with
    reasoning_suffix: str = REFERENCE_REASONING_SUFFIX
    # the ViT limits of an edit's source image the stack was configured (stage 4: trained) with; unset fields, and
    # every field of a checkpoint that records none, are the base's default (edit_source.default_vit_limits)
    edit_vit_limits: VitPixelLimits = field(default_factory=VitPixelLimits)


# StackedARModule's hyper-parameters of the edit ViT limits, by VitPixelLimits field.
EDIT_VIT_LIMIT_HPARAMS = {"min_pixels": "edit_vit_min_pixels", "max_pixels": "edit_vit_max_pixels",
                          "min_side": "edit_min_image_side"}


def recorded_edit_vit_limits(path: Path, checkpoint: dict) -> VitPixelLimits:
    """The edit ViT limits a Lightning checkpoint records: a stage 4 checkpoint's ``edit_vit_limits`` in its
    ``unified_tune_config``, else a ``StackedARModule``'s ``edit_vit_*`` hyper-parameters; unset when neither is
    there (checkpoints written before either existed)."""
    if _is_stage4(checkpoint) and "edit_vit_limits" in checkpoint[STAGE4_CONFIG_KEY]:
        key = f"{STAGE4_CONFIG_KEY}.edit_vit_limits"
        recorded = dict(checkpoint[STAGE4_CONFIG_KEY]["edit_vit_limits"])
    else:
        key = "hyper_parameters.edit_vit_*"
        hparams = checkpoint.get("hyper_parameters") or {}
        recorded = {name: hparams.get(hparam) for name, hparam in EDIT_VIT_LIMIT_HPARAMS.items()}
    unknown = sorted(set(recorded) - set(EDIT_VIT_LIMIT_HPARAMS))
    if unknown:
        raise KeyError(f"{path}: {key} has unknown fields {unknown} (expected {sorted(EDIT_VIT_LIMIT_HPARAMS)})")
    try:
        return VitPixelLimits(**recorded)
    except ValueError as error:
        raise ValueError(f"{path}: {key}: {error}") from None


# MM-MVR/STAR generates at --vq-image-size 384 (24 x 24 codes of a 16x VQ).
REFERENCE_IMAGE_SIZE = 384


def load_stage2(
    ckpt: str | Path,
    base: str | Path | None = None,
    vq: str | Path | None = None,
    vq_flavour: str | None = None,
) -> Stage2Weights:
    """Load a stage 2 checkpoint: a ``StackedARModule`` ``.ckpt`` or a ``save_stacked_ar`` directory; from a
    stage 4 (``UnifiedTuneModule``) ``.ckpt``, its stack.

    ``base`` / ``vq`` override the recorded paths; the weights found there must still have the checksums
    the checkpoint recorded (:class:`FrozenWeightsChangedError` otherwise). The image size is the recorded
    one (None when nothing records it; 384 for an ``import-reference`` directory).
    """
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        return _stage2_from_directory(ckpt, base, vq, vq_flavour)
    if ckpt.is_file():
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        prefix = STAGE4_STACK_PREFIX if _is_stage4(checkpoint) else STAGE2_STATE_PREFIX
        return _stage2_from_lightning_checkpoint(ckpt, base, vq, vq_flavour, checkpoint, prefix=prefix)
    raise FileNotFoundError(f"no stage 2 checkpoint at {ckpt}")


IMPORT_REPORT = "import_report.json"


def _stage2_from_directory(directory: Path, base, vq, vq_flavour) -> Stage2Weights:
    config_file = directory / STACKED_AR_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no {STACKED_AR_CONFIG}: not a save_stacked_ar / import-reference directory")
    config = json.loads(config_file.read_text())
    model = load_stacked_ar(directory, base_path=base)
    vq_path = Path(vq) if vq is not None else directory / "vq"
    if not vq_path.exists():
        raise FileNotFoundError(f"no VQ for {directory}: it has no vq/ folder; pass vq (--vq)")
    recorded_size = config.get("image_size")
    if recorded_size is None and (directory / IMPORT_REPORT).is_file():
        recorded_size = REFERENCE_IMAGE_SIZE
    suffix = config.get("reasoning_suffix")
    return Stage2Weights(model, load_vq(vq_path, vq_flavour), str(base or config["base_path"]), recorded_size,
                         REFERENCE_REASONING_SUFFIX if suffix is None else suffix)


def _stage2_from_lightning_checkpoint(path: Path, base, vq, vq_flavour, checkpoint: dict | None = None,
                                      prefix: str = STAGE2_STATE_PREFIX) -> Stage2Weights:
    """``checkpoint``: the loaded ``path`` (stage 4 reads it once for both models); ``prefix``: of the stack's keys."""
    if checkpoint is None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if STACKED_AR_CONFIG_KEY in checkpoint:
        config = dict(checkpoint[STACKED_AR_CONFIG_KEY])
    else:  # written before the entry existed: the module's hyper-parameters hold the same fields
        hparams = checkpoint.get("hyper_parameters", {})
        config = {k: hparams.get(k) for k in STACKED_AR_FIELDS}
        config["base_dtype"] = config["base_dtype"] or "float32"
        config["stack_init"] = config["stack_init"] or "vlm"
    missing = [k for k in ("num_stack_layers", "adapter_depth", "base_path", "vq_path") if config.get(k) is None]
    if missing:
        raise KeyError(f"{path}: no {STACKED_AR_CONFIG_KEY!r} entry and hyper_parameters lack {missing}; "
                       "not a StackedARModule checkpoint")
    if FROZEN_CHECKSUMS_KEY not in checkpoint:
        raise KeyError(f"{path} has no {FROZEN_CHECKSUMS_KEY!r}: not a StackedARModule checkpoint")
    base_path = str(base) if base is not None else config["base_path"]
    if vq is not None:
        config["vq_path"], config["vq_flavour"] = str(vq), vq_flavour
    base_model = load_base_vlm(base_path, dtype=config["base_dtype"])
    vq_model = load_vq(config["vq_path"], config["vq_flavour"])
    loaded = {"base": base_state_checksum(base_model), "vq": base_state_checksum(vq_model)}
    recorded = checkpoint[FROZEN_CHECKSUMS_KEY]
    changed = [name for name in ("base", "vq") if recorded.get(name) != loaded[name]]
    if changed:
        paths = {"base": base_path, "vq": config["vq_path"]}
        raise FrozenWeightsChangedError(
            f"{path} was trained on different frozen weights than "
            + ", ".join(f"{name} at {paths[name]}" for name in changed)
            + "; point base / vq at the ones it was trained with"
        )
    # vlm init only builds the right structure; every trainable weight is overwritten below.
    model = StackedAR(
        base_model,
        num_stack_layers=config["num_stack_layers"],
        adapter_depth=config["adapter_depth"],
        codebook_size=vq_model.config.codebook_size,
        codebook_dim=vq_model.config.codebook_embed_dim,
        dtype=torch.float32,
        stack_rope_theta=config["stack_rope_theta"],
    )
    model.stack_init = config["stack_init"]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_trainable_state_dict(state)
    recorded_size = (
        checkpoint.get("hyper_parameters", {}).get("image_size")
        or checkpoint.get(IMAGE_SIZE_KEY)
        or checkpoint.get("datamodule_hyper_parameters", {}).get("resolution")
    )
    suffix = config.get("reasoning_suffix")
    return Stage2Weights(model, vq_model, base_path, recorded_size,
                         REFERENCE_REASONING_SUFFIX if suffix is None else suffix,
                         recorded_edit_vit_limits(path, checkpoint))


# ---- the released STAR checkpoints (reference layout) -------------------------------------------

DIFFUSION_DECODER_WEIGHTS = "diffusion_decoder.safetensors"
REPORT_FILE = "import_report.json"


def read_reference_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path)['state_dict']``, memory-mapped so a 7B checkpoint is not read into RAM at once."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        keys = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise KeyMismatchError(f"{path}: expected a dict with a 'state_dict' entry (reference layout), got {keys}")
    state = payload["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise KeyMismatchError(f"{path}: non-tensor entries in state_dict: {bad[:20]}")
    return state


def import_reference(ckpt: Path, base_dir: Path, out: Path, vq_flavour: str, lumina_dir: Path | None = None) -> dict:
    """Map ``ckpt`` onto our modules, write them to ``out`` and return the coverage report.

    With ``lumina_dir`` (a Lumina-Image-2.0 directory, for the architecture) the ``diffusion_decoder.*`` keys
    load strictly into a ``DiffusionDecoder`` written to ``out/diffusion_decoder``; without it they are
    stored aside as ``diffusion_decoder.safetensors``.
    """
    state = read_reference_checkpoint(ckpt)
    shape = infer_stack_shape(state)
    parts = split_reference_state_dict(state)
    llm_dtypes = {v.dtype for k, v in parts.stacked_ar.items() if k.startswith("base.")}
    if len(llm_dtypes) > 1:
        raise ValueError(f"{ckpt}: llm.* tensors mix dtypes {sorted(map(str, llm_dtypes))}")
    base = load_base_vlm(base_dir, dtype=llm_dtypes.pop() if llm_dtypes else torch.float32)
    model = StackedAR(
        base,
        num_stack_layers=shape.num_stack_layers,
        adapter_depth=shape.adapter_depth,
        codebook_size=shape.codebook_size,
        codebook_dim=shape.codebook_dim,
    )
    stacked_ar_coverage(model, parts.stacked_ar).raise_if_incomplete()
    differing = base_differences(model, parts.stacked_ar)
    if differing:
        raise ValueError(
            f"{ckpt}: {len(differing)} llm.* tensors differ from the base in {base_dir} "
            f"(first: {differing[:5]}); pass the Qwen2.5-VL directory the checkpoint was trained on"
        )
    coverage = {"stacked_ar": load_reference_into(model, parts.stacked_ar).as_dict()}
    report: dict = {
        "checkpoint": str(ckpt),
        "base": str(base_dir),
        "stack": vars(shape),
        "keys_in_checkpoint": len(state),
        "coverage": coverage,
    }
    save_stacked_ar(model, out, base_dir)

    if parts.vq:
        vq = VQModel(vq_config(vq_flavour, codebook_projector=False))
        vq.load_reference_state_dict(parts.vq, source=f"{ckpt} pixel_encoder.*")
        if (vq.config.codebook_size, vq.config.codebook_embed_dim) != (shape.codebook_size, shape.codebook_dim):
            raise ValueError(
                f"VQ codebook {vq.config.codebook_size} x {vq.config.codebook_embed_dim} does not match the "
                f"pixel head/adapter ({shape.codebook_size} x {shape.codebook_dim})"
            )
        vq.save_pretrained(out / "vq")
        # load_reference_state_dict above is strict, so every key matched
        coverage["pixel_encoder"] = {"expected": len(vq.state_dict()), "matched": len(parts.vq)}
    else:
        coverage["pixel_encoder"] = {"expected": None, "matched": 0, "note": "no pixel_encoder.* keys in checkpoint"}

    decoder_file = None
    if parts.diffusion_decoder and lumina_dir is not None:
        from lit_star.models.diffusion_decoder import save_decoder

        decoder, scheduler = import_reference_decoder(parts.diffusion_decoder, Path(lumina_dir), shape.codebook_dim,
                                                      f"{ckpt} diffusion_decoder.*")
        save_decoder(decoder, out / "diffusion_decoder", dict(scheduler.config))
        decoder_file = "diffusion_decoder/"
    elif parts.diffusion_decoder:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in parts.diffusion_decoder.items()}, str(out / DIFFUSION_DECODER_WEIGHTS))
        decoder_file = DIFFUSION_DECODER_WEIGHTS
    report["diffusion_decoder"] = {
        "keys": len(parts.diffusion_decoder),
        "parameters": sum(v.numel() for v in parts.diffusion_decoder.values()),
        "file": decoder_file,
        "loaded_strictly": bool(parts.diffusion_decoder and lumina_dir is not None),
    }
    accounted = coverage["stacked_ar"]["matched"] + len(parts.vq) + len(parts.diffusion_decoder)
    report["keys_accounted"] = accounted
    report["keys_tied_aliases"] = len(state) - accounted
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- stage 3: the diffusion decoder --------------------------------------------------------------

STAGE3_CONFIG_KEY = "diffusion_decoder_config"
STAGE3_STATE_PREFIX = "decoder.denoiser."
LUMINA_PARTS = {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder",
                "tokenizer": "tokenizer", "scheduler": "scheduler"}


@dataclass
class DecoderSpec:
    """Where a stage 3 decoder's parts come from (every field is a recipe field of ``DiffusionDecoderModule``).

    * ``lumina_path``: a Lumina-Image-2.0 directory (``transformer/``, ``vae/``, ``text_encoder/``,
      ``tokenizer/``, ``scheduler/``); its DiT initialises ours (``embedder_init``), the rest is frozen;
    * otherwise ``transformer`` (a ``DIT_FLAVOURS`` name or a config dict) is built fresh, ``vae_path`` an
      ``AutoencoderKL`` directory or ``pixel_space: true`` (no VAE), and ``text_encoder_path`` a directory with
      a ``Gemma2Model`` and its tokenizer or ``tiny_text_encoder`` (kwargs of ``tiny_text_encoder``).
    """

    conditioning: str = "channel"
    lumina_path: str | None = None
    transformer: str | dict | None = None
    embedder_init: str = "scatter"
    vae_path: str | None = None
    pixel_space: bool = False
    text_encoder_path: str | None = None
    tiny_text_encoder: dict | None = None
    max_caption_tokens: int = 256
    system_prompt: str | None = "default"
    scheduler_shift: float | None = None
    seed: int = 0

    def validate(self) -> None:
        """Every check that needs no weights: raises ``ConfigError`` naming the field."""
        from lit_star.models.diffusion_decoder import CONDITIONING_MODES, DIT_FLAVOURS, EMBEDDER_INITS, ConfigError

        if self.conditioning not in CONDITIONING_MODES:
            raise ConfigError(f"conditioning must be one of {list(CONDITIONING_MODES)}, got {self.conditioning!r}")
        if self.embedder_init not in EMBEDDER_INITS:
            raise ConfigError(f"embedder_init must be one of {list(EMBEDDER_INITS)}, got {self.embedder_init!r}")
        if self.lumina_path is None and self.transformer is None:
            raise ConfigError("set lumina_path (a Lumina-Image-2.0 directory) or transformer (a flavour or config)")
        if isinstance(self.transformer, str) and self.transformer not in DIT_FLAVOURS:
            raise ConfigError(f"transformer: unknown flavour {self.transformer!r}; choose from {sorted(DIT_FLAVOURS)}")
        if self.lumina_path is not None:
            for part in LUMINA_PARTS.values():
                if not (Path(self.lumina_path) / part).is_dir():
                    raise ConfigError(f"lumina_path: {Path(self.lumina_path) / part} is not a directory")
        if self.pixel_space and self.vae_path is not None:
            raise ConfigError("pixel_space and vae_path exclude each other")
        if self.lumina_path is None and not self.pixel_space and self.vae_path is None:
            raise ConfigError("set vae_path (an AutoencoderKL directory) or pixel_space: true")
        if self.lumina_path is None and (self.text_encoder_path is None) == (self.tiny_text_encoder is None):
            raise ConfigError("set exactly one of text_encoder_path and tiny_text_encoder")
        for name in ("vae_path", "text_encoder_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise ConfigError(f"{name}: {value} is not a directory")
        if self.max_caption_tokens < 1:
            raise ConfigError(f"max_caption_tokens must be >= 1, got {self.max_caption_tokens}")


def build_diffusion_decoder(spec: DecoderSpec, codebook_dim: int, empty: bool = False, dit_weights: bool = True):
    """(DiffusionDecoder, FlowMatchEulerDiscreteScheduler) from ``spec``.

    ``empty`` builds every part from its config without reading weights; ``dit_weights=False`` skips only the
    Lumina DiT's (for loaders that overwrite them).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from transformers import AutoTokenizer, Gemma2Model

    from lit_star.models.diffusion_decoder import (
        DIT_FLAVOURS,
        LUMINA2_SYSTEM_PROMPT,
        DecoderConfig,
        Denoiser,
        DiffusionDecoder,
        build_scheduler,
        build_transformer,
        tiny_text_encoder,
        transformer_from_lumina,
    )

    spec.validate()
    root = Path(spec.lumina_path) if spec.lumina_path else None
    system_prompt = LUMINA2_SYSTEM_PROMPT if spec.system_prompt == "default" else spec.system_prompt
    # Text encoder and tokenizer.
    if spec.text_encoder_path is not None or root is not None:
        encoder_dir = Path(spec.text_encoder_path) if spec.text_encoder_path else root / "text_encoder"
        tokenizer_dir = encoder_dir if spec.text_encoder_path else root / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if empty:
            from transformers import AutoConfig

            text_encoder = Gemma2Model(AutoConfig.from_pretrained(encoder_dir, local_files_only=True))
        else:
            text_encoder = Gemma2Model.from_pretrained(encoder_dir, local_files_only=True)
    else:
        tokenizer, text_encoder = tiny_text_encoder(**spec.tiny_text_encoder)
    # Latent space.
    vae = None
    if not spec.pixel_space:
        vae_dir = Path(spec.vae_path) if spec.vae_path else root / "vae"
        vae = (AutoencoderKL.from_config(AutoencoderKL.load_config(vae_dir)) if empty
               else AutoencoderKL.from_pretrained(vae_dir, local_files_only=True))
    latent_channels = vae.config.latent_channels if vae is not None else 3
    downsample = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    shift = float(vae.config.shift_factor or 0.0) if vae is not None else 0.0
    scale = float(vae.config.scaling_factor) if vae is not None else 1.0
    # The DiT.
    if root is not None and spec.transformer is None:
        stock_config = Lumina2Transformer2DModel.load_config(root / "transformer")
        transformer_config = {k: v for k, v in stock_config.items()
                              if not k.startswith("_") and k not in ("in_channels", "out_channels")}
    elif isinstance(spec.transformer, str):
        transformer_config = dict(DIT_FLAVOURS[spec.transformer])
    else:
        transformer_config = dict(spec.transformer)
    config = DecoderConfig(
        transformer=transformer_config, latent_channels=latent_channels, codebook_dim=codebook_dim,
        conditioning=spec.conditioning, max_caption_tokens=spec.max_caption_tokens, system_prompt=system_prompt,
        vae_shift=shift, vae_scale=scale, latent_downsample=downsample,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)  # a fresh DiT / projection is the same for the same seed
    try:
        if root is not None and spec.transformer is None and not empty and dit_weights:
            stock = Lumina2Transformer2DModel.from_pretrained(root / "transformer", local_files_only=True)
            transformer = transformer_from_lumina(stock, config, spec.embedder_init)
        else:
            transformer = build_transformer(config)
        denoiser = Denoiser(config, transformer)
    finally:
        torch.random.set_rng_state(state)
    # The scheduler.
    if root is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True)
        if spec.scheduler_shift is not None:
            scheduler = build_scheduler(**dict(scheduler.config, shift=spec.scheduler_shift))
    else:
        scheduler = build_scheduler(shift=spec.scheduler_shift if spec.scheduler_shift is not None else 1.0)
    return DiffusionDecoder(denoiser, text_encoder.eval(), tokenizer, vae.eval() if vae is not None else None), scheduler


@dataclass
class Stage3Weights:
    """A loaded stage 3 decoder, its scheduler and its VQ (None when the source records none)."""

    decoder: object
    scheduler: object
    vq: VQModel | None


def import_reference_decoder(state: dict[str, torch.Tensor], lumina_dir: Path, codebook_dim: int, source: str):
    """A ``DiffusionDecoder`` holding the reference's ``diffusion_decoder.*`` (prefix stripped), strictly.

    The architecture comes from ``lumina_dir`` (a Lumina-Image-2.0 directory: configs, tokenizer, scheduler);
    no weights are read from it.
    """
    from lit_star.models.diffusion_decoder import load_reference_decoder_state

    decoder, scheduler = build_diffusion_decoder(DecoderSpec(lumina_path=str(lumina_dir)), codebook_dim, empty=True)
    load_reference_decoder_state(decoder, state, source)
    return decoder.eval(), scheduler


def export_decoder_reference(decoder) -> dict[str, dict[str, torch.Tensor]]:
    """``{"state_dict": {"diffusion_decoder.<reference key>": tensor}}`` of a channel-conditioned decoder."""
    from lit_star.models.diffusion_decoder import reference_decoder_state_dict
    from lit_star.models.reference_format import DIFFUSION_DECODER_PREFIX

    return {"state_dict": {DIFFUSION_DECODER_PREFIX + k: v for k, v in reference_decoder_state_dict(decoder).items()}}


def load_stage3(ckpt: str | Path, vq: str | Path | None = None, vq_flavour: str | None = None) -> Stage3Weights:
    """A ``DiffusionDecoderModule`` checkpoint (``.ckpt``) or a ``save_decoder`` directory (``import-reference``
    writes one as ``OUT/diffusion_decoder``); from a stage 4 (``UnifiedTuneModule``) ``.ckpt``, its decoder.
    ``vq`` overrides the recorded VQ (a directory's ``../vq``)."""
    from lit_star.models.diffusion_decoder import load_decoder

    ckpt = Path(ckpt)
    if ckpt.is_dir():
        decoder, scheduler = load_decoder(ckpt)
        vq_path = Path(vq) if vq is not None else ckpt.parent / "vq"
        return Stage3Weights(decoder, scheduler, load_vq(vq_path, vq_flavour) if vq_path.exists() else None)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no stage 3 checkpoint at {ckpt}")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    prefix = STAGE4_DECODER_PREFIX if _is_stage4(checkpoint) else STAGE3_STATE_PREFIX
    return _stage3_from_lightning_checkpoint(ckpt, checkpoint, vq, vq_flavour, prefix=prefix)


def _stage3_from_lightning_checkpoint(ckpt: Path, checkpoint: dict, vq, vq_flavour, prefix: str = STAGE3_STATE_PREFIX,
                                      vq_model: VQModel | None = None) -> Stage3Weights:
    """``prefix``: of the DiT's keys; ``vq_model``: a VQ already loaded (stage 4 shares the stack's)."""
    if not isinstance(checkpoint, dict) or STAGE3_CONFIG_KEY not in checkpoint:
        raise KeyError(f"{ckpt} has no {STAGE3_CONFIG_KEY!r}: not a DiffusionDecoderModule checkpoint")
    recorded = checkpoint[STAGE3_CONFIG_KEY]
    if vq_model is None:
        vq_model = load_vq(vq if vq is not None else recorded["vq_path"],
                           vq_flavour if vq is not None else recorded["vq_flavour"])
    spec = DecoderSpec(**recorded["spec"])
    decoder, scheduler = build_diffusion_decoder(spec, vq_model.config.codebook_embed_dim, dit_weights=False)
    loaded = {"vq": base_state_checksum(vq_model)}
    loaded.update({name: base_state_checksum(module) for name, module in decoder.frozen_modules().items()})
    # only the parts this loader loads (a stage 4 checkpoint also records the base's)
    changed = sorted(name for name, value in checkpoint.get(FROZEN_CHECKSUMS_KEY, {}).items()
                     if name in loaded and loaded[name] != value)
    if changed:
        raise FrozenWeightsChangedError(f"{ckpt} was trained on different frozen weights ({', '.join(changed)})")
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    decoder.denoiser.load_state_dict(state, strict=True)
    return Stage3Weights(decoder.eval(), scheduler, vq_model)


# ---- stage 4: the stack and the decoder tuned together ------------------------------------------

STAGE4_CONFIG_KEY = "unified_tune_config"
# Where UnifiedTuneModule keeps its two models' trainable weights in its state_dict.
STAGE4_STACK_PREFIX = "autoregressive." + STAGE2_STATE_PREFIX
STAGE4_DECODER_PREFIX = "diffusion." + STAGE3_STATE_PREFIX


def _is_stage4(checkpoint) -> bool:
    return isinstance(checkpoint, dict) and STAGE4_CONFIG_KEY in checkpoint


@dataclass
class Stage4Weights:
    """A loaded stage 4 result: the stack (with its VQ) and the decoder (sharing that VQ), and how they trained."""

    stage2: Stage2Weights
    stage3: Stage3Weights
    config: dict


def load_stage4(ckpt: str | Path, base: str | Path | None = None, vq: str | Path | None = None,
                vq_flavour: str | None = None) -> Stage4Weights:
    """A ``UnifiedTuneModule`` checkpoint: both models rebuilt through the stage 2 and stage 3 loaders, each frozen
    part checked against the checksum the checkpoint recorded; ``base`` / ``vq`` override the recorded paths."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no stage 4 checkpoint at {ckpt}")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    if not _is_stage4(checkpoint):
        raise KeyError(f"{ckpt} has no {STAGE4_CONFIG_KEY!r}: not a UnifiedTuneModule checkpoint")
    stage2 = _stage2_from_lightning_checkpoint(ckpt, base, vq, vq_flavour, checkpoint, prefix=STAGE4_STACK_PREFIX)
    stage3 = _stage3_from_lightning_checkpoint(ckpt, checkpoint, vq, vq_flavour, prefix=STAGE4_DECODER_PREFIX,
                                               vq_model=stage2.vq)
    return Stage4Weights(stage2, stage3, dict(checkpoint[STAGE4_CONFIG_KEY]))
