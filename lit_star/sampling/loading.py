"""One place that turns a stage 2 checkpoint into a :class:`~lit_star.sampling.modes.Star` ready to sample.

Accepted ``ckpt``:

- a ``save_stacked_ar`` directory (``stacked_ar.json`` + ``stacked_ar.safetensors``), e.g. the output of
  ``python -m lit_star import-reference`` for STAR-3B/7B; its VQ is ``vq`` (or the directory's ``vq/``);
- a Lightning ``.ckpt`` of :class:`~lit_star.modules.stacked_ar_module.StackedARModule`; base and VQ are
  re-read from the paths in its hyper-parameters and must match the checksums it recorded.

The code grid follows from the image size the stack was trained at: given explicitly, or recorded
(``image_size`` in ``stacked_ar.json`` or the module's hyper-parameters, the datamodule's ``resolution``),
or 384 for an ``import-reference`` directory (the released models' VQ resolution).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lit_star.models.base_vlm import load_processor
from lit_star.models.sequence_layout import SequenceLayout
from lit_star.models.stacked_ar import STACKED_AR_CONFIG, load_stacked_ar
from lit_star.sampling.modes import Star

# MM-MVR/STAR generates at --vq-image-size 384 (24 x 24 codes of a 16x VQ).
REFERENCE_IMAGE_SIZE = 384
IMPORT_REPORT = "import_report.json"


def load_star(
    ckpt: str | Path,
    *,
    base: str | Path | None = None,
    vq: str | Path | None = None,
    vq_flavour: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    stack_dtype: torch.dtype | None = None,
) -> Star:
    """Load a stage 2 checkpoint (see the module docstring) with its VQ, processor and layout, in eval mode.

    Args:
        base: Qwen2.5-VL directory overriding the recorded one (its checksum must still match).
        vq: VQ checkpoint overriding the recorded/bundled one (``load_vq`` formats; ``vq_flavour`` for a
            reference ``VQ-Model.pt``).
        image_size: side of the generated images; overrides any recorded value. Without either, the
            returned ``Star`` can answer questions but raises on generation.
        stack_dtype: run the stack, adapter and pixel head in this dtype (they are stored in fp32, the
            training master weights; ``torch.bfloat16`` on GPUs). The base keeps its own dtype.
    """
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        star_parts = _from_stacked_ar_dir(ckpt, base, vq, vq_flavour)
    elif ckpt.is_file():
        star_parts = _from_lightning_checkpoint(ckpt, base, vq, vq_flavour)
    else:
        raise FileNotFoundError(f"no stage 2 checkpoint at {ckpt}")
    model, vq_model, base_path, recorded_size = star_parts
    size = image_size or recorded_size
    processor = load_processor(base_path)
    model = model.to(device).eval()
    if stack_dtype is not None:
        for trainable in (model.stack, model.adapter, model.pixel_head):
            trainable.to(stack_dtype)
    vq_model = vq_model.to(device).eval()
    layout = SequenceLayout(processor.tokenizer, model.base.config)
    return Star(model=model, vq=vq_model, processor=processor, layout=layout, image_size=None if size is None else int(size))


def _from_stacked_ar_dir(directory: Path, base, vq, vq_flavour):
    from lit_star.commands.tokenize import load_vq

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
    return model, load_vq(vq_path, vq_flavour), base or config["base_path"], recorded_size


def _from_lightning_checkpoint(path: Path, base, vq, vq_flavour):
    from lit_star.modules.stacked_ar_module import IMAGE_SIZE_KEY, StackedARModule

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no hyper_parameters / state_dict)")
    # Keys with a leading underscore are Lightning's own bookkeeping (e.g. LightningCLI's instantiator).
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    if "num_stack_layers" not in hparams or "base_path" not in hparams:
        raise KeyError(f"{path}: hyper_parameters lack num_stack_layers/base_path; not a StackedARModule checkpoint")
    if base is not None:
        hparams["base_path"] = str(base)
    if vq is not None:
        hparams["vq_path"], hparams["vq_flavour"] = str(vq), vq_flavour
    hparams["init_from"] = None  # the checkpoint's own weights replace any initialisation
    # A training option: one-token decode steps with a growing cache recompile a layer compiled for
    # training until dynamo gives up (30 s lost per ShapesEval process); sampling has its own flag.
    hparams["compile_layers"] = False
    module = StackedARModule(**hparams)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    module.on_load_checkpoint(checkpoint)  # refuses a base / VQ other than the ones it was trained on
    recorded_size = (
        hparams.get("image_size")
        or checkpoint.get(IMAGE_SIZE_KEY)
        or checkpoint.get("datamodule_hyper_parameters", {}).get("resolution")
    )
    return module.stacked_ar, module.vq, hparams["base_path"], recorded_size
