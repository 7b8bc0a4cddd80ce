"""Stage 2 (StackedARModule): frozen base preserved bit for bit, checksums, exact resume, recipes."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration


from tests.stage2_fixtures import CAPTIONS, QUESTIONS, IMAGE_SIZE, loader, write_micro_base, write_small_vq  # noqa: E402

from lit_star.models.base_vlm import decoder_layers, encode_chat, load_processor  # noqa: E402
from lit_star.models.flavours import qwen2_5_vl_config  # noqa: E402
from lit_star.models.sequence_layout import IGNORE_INDEX  # noqa: E402
from lit_star.checkpoints import FROZEN_CHECKSUMS_KEY, FrozenWeightsChangedError  # noqa: E402
from lit_star.modules.stacked_ar_module import StackedARModule, unigram_entropy  # noqa: E402
from lit_star.training import StarCLI  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STAGE2_RECIPES = REPO / "recipes" / "stage2_stacked_ar"
TRAINER_ARGS = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                "--trainer.precision", "32-true"]


@pytest.fixture(scope="module")
def frozen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    return write_micro_base(root / "base"), write_small_vq(root / "vq")


def make_module(frozen_dirs, **overrides) -> StackedARModule:
    base, vq = frozen_dirs
    kwargs = dict(base_path=str(base), vq_path=str(vq), num_stack_layers=1, adapter_depth=2, loss_chunk_size=48,
                  log_images=0)
    return StackedARModule(**{**kwargs, **overrides})


def make_trainer(max_steps: int, tmp_path: Path | None = None, callbacks=(), **kwargs) -> L.Trainer:
    checkpointing = tmp_path is not None
    if checkpointing:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0,
                                                 every_n_train_steps=1)]
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=checkpointing, callbacks=list(callbacks),
                     limit_val_batches=0, **kwargs)


def trainable_snapshot(module: StackedARModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_leaves_the_base_bit_identical_to_its_directory(frozen_dirs):
    base_dir, _ = frozen_dirs
    L.seed_everything(0)
    module = make_module(frozen_dirs)
    module.configure_model()
    stack_before = trainable_snapshot(module)
    make_trainer(3).fit(module, loader(12, 4))  # images: the VQ encodes them on the fly

    stack_after = module.state_dict()
    assert any(not torch.equal(stack_before[k], stack_after[k]) for k in stack_before), "nothing trained"
    assert all(not p.requires_grad for p in module.stacked_ar.base.parameters())
    assert not module.stacked_ar.base.training

    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    trained_state, reference_state = module.stacked_ar.base.state_dict(), reference.state_dict()
    assert trained_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert torch.equal(trained_state[name], tensor), f"base weight {name} changed"

    processor = load_processor(base_dir)
    images = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(2)]
    inputs = encode_chat(processor, QUESTIONS, images)
    with torch.no_grad():
        ours = module.stacked_ar.base(**inputs).logits
        theirs = reference(**inputs).logits
    assert torch.equal(ours, theirs), "understanding logits differ from the untouched base"


@pytest.mark.parametrize("frozen", ["base", "vq"])
def test_changed_frozen_weights_refuse_to_save(frozen_dirs, tmp_path, frozen):
    module = make_module(frozen_dirs)
    trainer = make_trainer(1)
    trainer.fit(module, loader(4, 4, with_codes=True))
    trainer.save_checkpoint(tmp_path / "fine.ckpt")
    part = module.stacked_ar.base if frozen == "base" else module.vq
    with torch.no_grad():
        next(part.parameters()).add_(1e-3)
    with pytest.raises(FrozenWeightsChangedError, match=f"frozen {frozen} weights changed"):
        trainer.save_checkpoint(tmp_path / "tampered.ckpt")
    assert not (tmp_path / "tampered.ckpt").exists()


class CaptureStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.weights = trainable_snapshot(pl_module)


def test_resume_from_last_continues_exactly(frozen_dirs, tmp_path):
    L.seed_everything(0)
    make_trainer(2, tmp_path).fit(make_module(frozen_dirs), loader(16, 4, with_codes=True))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert all(k.startswith("model.stacked_ar.") and ".base." not in k for k in last["state_dict"]), \
        "the checkpoint may hold only the trainable weights"
    assert {"stack", "adapter", "pixel_head"} <= {k.split(".")[2] for k in last["state_dict"]}
    assert set(last[FROZEN_CHECKSUMS_KEY]) == {"base", "vq"}
    reloaded = StackedARModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in last["state_dict"].items())

    L.seed_everything(123)  # the resumed run must not depend on the seed
    capture = CaptureStart()
    trainer = make_trainer(3, callbacks=[capture])
    last_path = tmp_path / "checkpoints" / "last.ckpt"
    trainer.fit(make_module(frozen_dirs), loader(16, 4, with_codes=True), ckpt_path=last_path)
    assert capture.global_step == 2 and trainer.global_step == 3
    for name, value in last["state_dict"].items():
        assert torch.equal(capture.weights[name], value), name
    saved, restored = last["optimizer_states"][0], capture.optimizer_state
    assert saved["param_groups"] == restored["param_groups"]
    assert saved["state"].keys() == restored["state"].keys()
    for key, state in saved["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(restored["state"][key][field], value, rtol=0, atol=0)


def test_resume_on_a_different_base_is_refused(frozen_dirs, tmp_path):
    make_trainer(1, tmp_path).fit(make_module(frozen_dirs), loader(4, 4, with_codes=True))
    other_base = write_micro_base(tmp_path / "other_base", seed=1)
    module = make_module((other_base, frozen_dirs[1]))
    with pytest.raises(FrozenWeightsChangedError, match="different frozen weights than base"):
        make_trainer(2).fit(module, loader(4, 4, with_codes=True), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")


def test_training_batches_follow_the_reference_layout_with_cfg_dropout(frozen_dirs):
    module = make_module(frozen_dirs, cfg_dropout=0.5)
    module.configure_model()
    batch = next(iter(loader(16, 16, with_codes=True)))
    sequences = module.layout_batch(batch, batch["codes"], cfg_dropout=True)
    special = module.layout.special
    unconditional = (sequences.input_ids == special.fim_pad).any(dim=1)
    assert 0 < int(unconditional.sum()) < 16, "about half the rows should be unconditional at p=0.5"
    again = module.layout_batch(batch, batch["codes"], cfg_dropout=True)
    assert torch.equal(sequences.input_ids, again.input_ids), "the draw is a function of (seed, epoch, key)"
    for row, codes in enumerate(batch["codes"]):
        labels = sequences.labels[row]
        assert torch.equal(labels[labels != IGNORE_INDEX], codes.flatten()), "labels are exactly the image codes"
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert int(sequences.input_ids[row, first]) == special.vision_start, "code 0 is predicted at <|vision_start|>"
    conditional = module.layout_batch(batch, batch["codes"], cfg_dropout=False)
    assert not (conditional.input_ids == special.fim_pad).any()
    unconditional = module.layout_batch(batch, batch["codes"], cfg_dropout=False, unconditional=True)
    assert (unconditional.input_ids == special.fim_pad).any(dim=1).all()
    assert torch.equal(unconditional.labels[unconditional.labels != IGNORE_INDEX],
                       conditional.labels[conditional.labels != IGNORE_INDEX]), "same images, no prompts"


def test_activation_checkpointing_changes_neither_loss_nor_gradients(frozen_dirs):
    batch = next(iter(loader(4, 4, with_codes=True)))
    results = []
    for plan in ((), ("base", "stack")):
        torch.manual_seed(0)
        module = make_module(frozen_dirs, activation_checkpointing=plan)
        module.configure_model()
        sequences = module.layout_batch(batch, batch["codes"], cfg_dropout=False)
        loss, _ = module.model(sequences, module._code_vectors(sequences.code_ids))
        loss.backward()
        results.append((loss.detach(), module.stacked_ar.adapter.layers[0].weight.grad.clone()))
    (loss_plain, grad_plain), (loss_ckpt, grad_ckpt) = results
    assert grad_plain.abs().sum() > 0, "the adapter must get gradients through the frozen base"
    torch.testing.assert_close(loss_ckpt, loss_plain)
    torch.testing.assert_close(grad_ckpt, grad_plain)


@pytest.mark.slow  # inductor compiles five layers (~25 s)
def test_compiled_layers_give_the_eager_loss_and_gradients(frozen_dirs):
    batch = next(iter(loader(4, 4, with_codes=True)))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        module = make_module(frozen_dirs, compile_layers=compiled)
        module.configure_model()
        layers = [*decoder_layers(module.stacked_ar.base), *module.stacked_ar.stack.layers]
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        sequences = module.layout_batch(batch, batch["codes"], cfg_dropout=False)
        loss, _ = module.model(sequences, module._code_vectors(sequences.code_ids))
        loss.backward()
        results.append((loss.detach(), module.stacked_ar.adapter.layers[0].weight.grad.clone(), set(module.state_dict())))
    (loss_eager, grad_eager, keys_eager), (loss_compiled, grad_compiled, keys_compiled) = results
    assert keys_compiled == keys_eager, "compiling must not rename parameters (checkpoints, checksums)"
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_compile_layers_without_a_cpp_compiler_is_refused_when_the_module_is_built(tmp_path):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("lit-star-no-such-compiler",)}), pytest.raises(RuntimeError, match=r"model.init_args.compile_layers needs a C\+\+ compiler"):
        StackedARModule(base_path=str(tmp_path / "missing"), vq_path=str(tmp_path / "missing"), flavour="shapes",
                        compile_layers=True)


def test_packed_rows_give_the_padded_loss(frozen_dirs):
    batch = next(iter(loader(4, 4, with_codes=True)))
    losses = []
    for row_length in (None, 400):
        torch.manual_seed(0)
        module = make_module(frozen_dirs, packed_row_length=row_length)
        module.configure_model()
        sequences = module.layout_batch(batch, batch["codes"], cfg_dropout=False)
        assert (sequences.attention_mask is None) == (row_length is not None)
        with torch.no_grad():
            losses.append(module.model(sequences, module._code_vectors(sequences.code_ids))[0])
    assert sequences.input_ids.shape[0] < 4, "400-token rows hold several ~90-token samples"
    torch.testing.assert_close(losses[1], losses[0])


def test_init_from_loads_a_saved_stack_and_checks_its_base(frozen_dirs, tmp_path):
    from lit_star.models.stacked_ar import save_stacked_ar

    source = make_module(frozen_dirs)
    source.configure_model()
    with torch.no_grad():
        for parameter in source.stacked_ar.adapter.parameters():
            parameter.add_(0.5)
    save_stacked_ar(source.stacked_ar, tmp_path / "stack", frozen_dirs[0])
    module = make_module(frozen_dirs, init_from=str(tmp_path / "stack"))
    module.configure_model()
    expected = source.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in module.state_dict().items())

    other_base = write_micro_base(tmp_path / "other_base", seed=1)
    with pytest.raises(FrozenWeightsChangedError, match="init_from"):
        make_module((other_base, frozen_dirs[1]), init_from=str(tmp_path / "stack")).configure_model()


def test_bad_stack_rope_theta_is_refused_before_any_weights_load(tmp_path):
    # Paths that do not exist: the error must come from the argument check, not from loading.
    with pytest.raises(ValueError, match="stack_rope_theta must be > 0"):
        StackedARModule(base_path=str(tmp_path / "no_base"), vq_path=str(tmp_path / "no_vq"), flavour="shapes",
                        stack_rope_theta=-1.0)


def test_unigram_entropy_is_the_entropy_of_the_code_frequencies():
    torch.testing.assert_close(unigram_entropy(torch.tensor([5.0, 5.0, 0.0])), torch.tensor(float(np.log(2.0))))
    torch.testing.assert_close(unigram_entropy(torch.tensor([0.0, 7.0])), torch.tensor(0.0))


class _Data(L.LightningDataModule):
    batch_size = 4

    def train_dataloader(self):
        return loader(8, self.batch_size, with_codes=True)


def test_global_batch_size_mismatch_is_refused(frozen_dirs):
    module = make_module(frozen_dirs, global_batch_size=4096)
    expected = "global batch 8 = data batch_size 4 x 1 processes x accumulate_grad_batches 2"
    with pytest.raises(ValueError, match=expected):
        make_trainer(1, accumulate_grad_batches=2).fit(module, datamodule=_Data())


def test_cosine_schedule_decays_to_its_floor_at_max_steps(frozen_dirs):
    module = make_module(frozen_dirs, learning_rate=1e-3, warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.1)
    trainer = make_trainer(3)
    trainer.fit(module, datamodule=_Data())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_schedule must be 'constant' or 'cosine', got 'linear'"):
        make_module(frozen_dirs, lr_schedule="linear")


# ---- recipes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def architecture_dirs(tmp_path_factory):
    """Config-only Qwen2.5-VL-3B/7B directories: enough to build the real architectures on the meta device."""
    root = tmp_path_factory.mktemp("architectures")
    for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        qwen2_5_vl_config(name).save_pretrained(root / name)
    return root


def parse_recipe(*configs: Path, overrides: tuple[str, ...] = ()) -> StarCLI:
    args = [arg for config in configs for arg in ("--config", str(config))]
    return StarCLI(args=[*args, *TRAINER_ARGS, *overrides], run=False)


@pytest.mark.parametrize(
    "recipe, architecture, stack, adapter",
    [("star_3b", "qwen2.5-vl-3b", 1.2e9, 5e6), ("star_7b", "qwen2.5-vl-7b", 3e9, 38e6)],
)
def test_full_size_recipes_build_on_meta_with_the_paper_sizes(
    recipe, architecture, stack, adapter, architecture_dirs, tmp_path
):
    layers = [STAGE2_RECIPES / "star_3b.yaml"] + ([STAGE2_RECIPES / "star_7b.yaml"] if recipe == "star_7b" else [])
    cli = parse_recipe(*layers, overrides=(
        "--model.init_args.base_path", str(architecture_dirs / architecture),
        "--trainer.default_root_dir", str(tmp_path)))
    module = cli.model
    with torch.device("meta"):
        module.configure_model()
    model = module.stacked_ar
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.stack) == pytest.approx(stack, rel=0.1)  # Table 8: 1.2B (16 layers) / 3B (14 layers)
    assert count(model.adapter) == pytest.approx(adapter, rel=0.1)  # Table 8: 5M / 38M
    assert model.pixel_head.out_features == 65536 and model.codebook_dim == 512
    assert module.hparams.global_batch_size == 4096 and module.hparams.learning_rate == 1e-3
    assert cli.trainer.max_steps == 20000
    data = cli.datamodule
    assert data.batch_size * 8 * 8 * cli.trainer.accumulate_grad_batches == 4096, "8 GPUs x 8 nodes in the recipe"


ABLATIONS = {
    "layers_8": ("num_stack_layers", 8),
    "layers_16": ("num_stack_layers", 16),
    "layers_32": ("num_stack_layers", 32),
    "layers_36": ("num_stack_layers", 36),
    "init_rand": ("stack_init", "rand"),
    "init_llm": ("stack_init", "llm"),
    "init_vlm": ("stack_init", "vlm"),
    "vq_vqgan_16384x8": ("vq_flavour", None),
}


def test_a_flavour_sets_the_stack_and_explicit_sizes_override_it(frozen_dirs):
    base, vq = frozen_dirs
    module = StackedARModule(base_path=str(base), vq_path=str(vq), flavour="shapes", adapter_depth=3)
    assert (module.hparams.num_stack_layers, module.hparams.adapter_depth) == (4, 3)
    with pytest.raises(KeyError, match="unknown stack flavour 'star-9b'"):
        StackedARModule(base_path=str(base), vq_path=str(vq), flavour="star-9b")
    with pytest.raises(ValueError, match="model.init_args.flavour"):
        StackedARModule(base_path=str(base), vq_path=str(vq), num_stack_layers=2)


def test_every_ablation_recipe_is_listed():
    assert {p.stem for p in (STAGE2_RECIPES / "ablations").glob("*.yaml")} == set(ABLATIONS)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablation_overrides_parse_onto_star_3b(ablation, tmp_path):
    recipe = STAGE2_RECIPES / "ablations" / f"{ablation}.yaml"
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("# Table 6") and "GenEval" in recipe.read_text().split("\ntrainer:")[0]
    cli = parse_recipe(STAGE2_RECIPES / "star_3b.yaml", recipe, overrides=("--trainer.default_root_dir", str(tmp_path)))
    field, value = ABLATIONS[ablation]
    assert cli.model.hparams[field] == value
    assert cli.model.hparams.adapter_depth == 2 and cli.model.hparams.learning_rate == 1e-3, "the rest stays STAR-3B"


def test_layer_ablation_builds_its_depth_on_meta(architecture_dirs, tmp_path):
    cli = parse_recipe(STAGE2_RECIPES / "star_3b.yaml", STAGE2_RECIPES / "ablations" / "layers_36.yaml", overrides=(
        "--model.init_args.base_path", str(architecture_dirs / "qwen2.5-vl-3b"),
        "--trainer.default_root_dir", str(tmp_path)))
    with torch.device("meta"):
        cli.model.configure_model()
    assert cli.model.stacked_ar.num_stack_layers == 36


def _write_t2i_shard(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for index in range(count):
            pixels = np.random.default_rng(index).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            sink.write({"__key__": f"{path.stem}_{index:04d}", "png": png.getvalue(),
                        "txt": CAPTIONS[index % len(CAPTIONS)], "json": {"category": "single_object"}})


def test_shapes_recipe_smoke_runs_on_pretokenized_shards(frozen_dirs, tmp_path):
    from lit_star.commands.tokenize import tokenize

    base, vq = frozen_dirs
    for split in ("train", "val"):
        _write_t2i_shard(tmp_path / "world" / "t2i" / f"{split}-000000.tar", 8)
    assert tokenize(vq=str(vq), shards=str(tmp_path / "world" / "t2i" / "*.tar"),
                    out=str(tmp_path / "world" / "t2i_codes"), device="cpu") == 0
    run = tmp_path / "run"
    codes = tmp_path / "world" / "t2i_codes"
    StarCLI(args=[
        "fit", "--config", str(REPO / "recipes" / "shapes" / "stage2_stacked_ar.yaml"),
        "--model.init_args.base_path", str(base), "--model.init_args.vq_path", str(vq),
        "--model.init_args.num_stack_layers", "1", "--model.init_args.log_images", "2",
        "--data.init_args.train_shards", str(codes / "train-*.tar"),
        "--data.init_args.val_shards", str(codes / "val-*.tar"),
        "--data.init_args.resolution", str(IMAGE_SIZE), "--data.init_args.batch_size", "4",
        "--data.init_args.val_batch_size", "4", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run),
    ])
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss", "val/loss", "val/loss_unconditional", "val/prompt_gain", "val/code_unigram_entropy"} <= set(events.Tags()["scalars"])
    assert "val/true_vs_teacher_forced_codes" in events.Tags()["images"]
