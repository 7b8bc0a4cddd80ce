"""Stage 4 recipes through the real CLI: the paper's numbers, agreement with the stage 2 / 3 recipes they continue,
the Shapes miniature and joint training run a few steps, resume is exact, and the global-batch check of a mixture."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from lit_star.checkpoints import STAGE4_DECODER_PREFIX, STAGE4_STACK_PREFIX, load_stage2, load_stage3, load_stage4
from lit_star.data import EditDataModule, ImageTextDataModule, MixtureDataModule
from lit_star.modules.diffusion_decoder_module import DiffusionDecoderModule
from lit_star.modules.schedules import check_global_batch_size
from lit_star.modules.stacked_ar_module import StackedARModule
from lit_star.modules.unified_tune_module import UnifiedTuneModule
from lit_star.training import StarCLI
from tests.resume_fixtures import checkpoint_difference
from tests.stage2_fixtures import CAPTIONS, IMAGE_SIZE, loader, write_micro_base, write_small_vq
from tests.stage3_fixtures import write_tiny_lumina
from tests.unit.test_diffusion_decoder_module import TINY_DIT

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
STAGE4 = RECIPES / "stage4_unified"
SHAPES4 = RECIPES / "shapes" / "stage4_unified.yaml"
SHAPES4_JOINT = RECIPES / "shapes" / "stage4_joint_from_scratch.yaml"
CPU = ("--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
       "--trainer.precision", "32-true")
# Stage 2 / 3 arguments that only their own optimisation or validation read; stage 4 has its own.
NOT_USED_IN_STAGE4 = {"learning_rate", "betas", "weight_decay", "warmup_steps", "lr_schedule", "min_lr_ratio",
                      "global_batch_size", "log_images", "_class_path", "_instantiator"}
STACK_ARGS = "--model.init_args.stacked_ar.init_args."
DECODER_ARGS = "--model.init_args.diffusion_decoder.init_args."


def parse(*configs: Path, overrides: tuple[str, ...] = ()) -> StarCLI:
    args = [arg for config in configs for arg in ("--config", str(config))]
    return StarCLI(args=[*args, *CPU, *overrides], run=False)


@pytest.fixture(scope="module")
def lumina(tmp_path_factory) -> Path:
    return write_tiny_lumina(tmp_path_factory.mktemp("lumina") / "lumina")


def _existing(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return str(path)


# ---- the paper recipes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay, steps, staged", [(None, 8000, True), ("joint_from_scratch", 32000, False)])
def test_paper_recipes_parse_with_table_9_values(overlay, steps, staged, lumina, tmp_path):
    configs = [STAGE4 / "star_3b.yaml"] + ([STAGE4 / f"{overlay}.yaml"] if overlay else [])
    inits = ()
    if staged:  # the stage 2 / 3 outputs must exist when the module is built
        inits = ("--model.init_args.init_stack_from", _existing(tmp_path / "s2.ckpt"),
                 "--model.init_args.init_decoder_from", _existing(tmp_path / "s3.ckpt"))
    cli = parse(*configs, overrides=(*inits, DECODER_ARGS + "lumina_path", str(lumina),
                                     "--trainer.default_root_dir", str(tmp_path / "run")))
    module = cli.model
    assert isinstance(module, UnifiedTuneModule)
    assert isinstance(module.autoregressive, StackedARModule) and isinstance(module.diffusion, DiffusionDecoderModule)
    hp = module.hparams
    assert hp.stack_learning_rate == hp.decoder_learning_rate == 1e-3 and hp.lr_schedule == "constant"
    assert hp.warmup_steps == 0 and hp.global_batch_size == 4608 and cli.trainer.max_steps == steps
    assert (hp.init_stack_from is not None, hp.init_decoder_from is not None) == (staged, staged)
    # The children's own arguments (not the parent's, lit_star.training._OuterModuleInstantiator).
    assert module.autoregressive.hparams.flavour == "star-3b" and module.autoregressive.hparams.stack_init == "vlm"
    assert module.diffusion.hparams.vq_resolution == 384 and module.diffusion.hparams.lumina_path == str(lumina)
    data = cli.datamodule
    assert isinstance(data, MixtureDataModule) and set(data.components) == {"t2i", "edit"}
    assert isinstance(data.components["edit"], EditDataModule)
    assert {c.resolution for c in data.components.values()} == {1024}, "Table 9: diffusion at 1024 px"
    # The recipe's 8 nodes x 8 GPUs give 4608; fit refuses any other product (check_global_batch_size).
    recipe = yaml.safe_load((STAGE4 / "star_3b.yaml").read_text())
    accumulate = cli.trainer.accumulate_grad_batches
    assert recipe["trainer"]["num_nodes"] == 8
    check_global_batch_size(SimpleNamespace(datamodule=data, world_size=8 * 8, accumulate_grad_batches=accumulate),
                            hp.global_batch_size)
    with pytest.raises(ValueError, match="global batch 2304"):
        check_global_batch_size(SimpleNamespace(datamodule=data, world_size=4 * 8,
                                                accumulate_grad_batches=accumulate), hp.global_batch_size)


@pytest.mark.parametrize("stage2, stage3, stage4", [
    (RECIPES / "stage2_stacked_ar" / "star_3b.yaml", RECIPES / "stage3_diffusion_decoder" / "lumina2.yaml",
     STAGE4 / "star_3b.yaml"),
    (RECIPES / "shapes" / "stage2_stacked_ar.yaml", RECIPES / "shapes" / "stage3_diffusion_decoder.yaml", SHAPES4),
], ids=["star_3b", "shapes"])
def test_stage4_models_repeat_the_stage_2_and_3_recipes_they_start_from(stage2, stage3, stage4, lumina, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("SHAPES_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SHAPES_WORLD", str(tmp_path / "world"))
    paper = stage4.parent.name == "stage4_unified"
    lumina_arg = ("--model.init_args.lumina_path", str(lumina)) if paper else ()
    run = ("--trainer.default_root_dir", str(tmp_path / "run"))
    ar = parse(stage2, overrides=run).model.hparams
    decoder_cli = parse(stage3, overrides=(*lumina_arg, *run))
    unified = parse(stage4, overrides=(
        "--model.init_args.init_stack_from", _existing(tmp_path / "s2.ckpt"),
        "--model.init_args.init_decoder_from", _existing(tmp_path / "s3.ckpt"),
        *((DECODER_ARGS + "lumina_path", str(lumina)) if paper else ()), *run))
    for stage_hp, child in ((ar, unified.model.autoregressive), (decoder_cli.model.hparams, unified.model.diffusion)):
        ours = {k: v for k, v in child.hparams.items() if k not in NOT_USED_IN_STAGE4}
        theirs = {k: v for k, v in stage_hp.items() if k not in NOT_USED_IN_STAGE4}
        assert ours == theirs, {k: (ours.get(k), theirs.get(k)) for k in ours.keys() | theirs.keys()
                                if ours.get(k) != theirs.get(k)}
    # Same text-to-image shards as stage 3 (whose resolution is the decoder's); the init paths are the runs' last.ckpt.
    t2i, stage3_data = unified.datamodule.components["t2i"], decoder_cli.datamodule
    assert t2i.shard_specs == stage3_data.shard_specs and t2i.codes_key == stage3_data.codes_key
    raw = {name: yaml.safe_load(path.read_text()) for name, path in (("2", stage2), ("3", stage3), ("4", stage4))}
    for stage, key in (("2", "init_stack_from"), ("3", "init_decoder_from")):
        expected = raw[stage]["trainer"]["default_root_dir"] + "/checkpoints/last.ckpt"
        assert raw["4"]["model"]["init_args"][key] == expected


# ---- the global-batch check of a mixture ------------------------------------------------------------------------


def _mixture(t2i_batch: int, edit_batch: int) -> MixtureDataModule:
    return MixtureDataModule(components={"t2i": ImageTextDataModule(batch_size=t2i_batch),
                                         "edit": EditDataModule(batch_size=edit_batch)},
                             weights={"t2i": 0.5, "edit": 0.5})


def test_global_batch_check_reads_a_mixtures_components():
    trainer = lambda data, accumulate=2: SimpleNamespace(datamodule=data, world_size=3,  # noqa: E731
                                                         accumulate_grad_batches=accumulate)
    check_global_batch_size(trainer(_mixture(4, 4)), 24)
    with pytest.raises(ValueError, match=r"global batch 12 = data batch_size 4 x 3 processes x "
                                         r"accumulate_grad_batches 1.*mixture components' batch_size"):
        check_global_batch_size(trainer(_mixture(4, 4), accumulate=1), 24)
    with pytest.raises(ValueError, match=r"one batch_size for every mixture component.*'t2i': 4, 'edit': 8"):
        check_global_batch_size(trainer(_mixture(4, 8)), 24)
    check_global_batch_size(trainer(_mixture(4, 8)), None)  # no target, no check
    with pytest.raises(ValueError, match="data.init_args.batch_size"):  # a single DataModule as before
        check_global_batch_size(trainer(ImageTextDataModule(batch_size=4)), 48)


# ---- the Shapes miniature, tiny ---------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_world(world: Path, vq: Path) -> None:
    """t2i_codes (png, caption, codes via ``tokenize``) and edit shards (source, target, instruction) at 32 px."""
    from lit_star.commands.tokenize import tokenize

    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # noqa: E731
    for split, count in (("train", 8), ("val", 2)):
        (world / "t2i").mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(world / "t2i" / f"{split}-000000.tar")) as sink:
            for i in range(count):
                sink.write({"__key__": f"t2i-{split}-{i:04d}", "png": _png(image()), "txt": CAPTIONS[i % 4].encode(),
                            "json": json.dumps({"category": "single_object"}).encode()})
        (world / "edit").mkdir(exist_ok=True)
        with wds.TarWriter(str(world / "edit" / f"{split}-000000.tar")) as sink:
            for i in range(count):
                sink.write({"__key__": f"edit-{split}-{i:04d}", "source.png": _png(image()),
                            "target.png": _png(image()), "txt": b"make the circle red",
                            "json": json.dumps({"category": "color"}).encode()})
    assert tokenize(vq=str(vq), shards=str(world / "t2i" / "*.tar"), out=str(world / "t2i_codes")) == 0


TINY_STACK = dict(num_stack_layers=1, adapter_depth=2, stack_rope_theta=1.0e6, loss_chunk_size=48)
TINY_DECODER = dict(transformer=TINY_DIT, pixel_space=True, tiny_text_encoder={"hidden_size": 16, "num_layers": 2},
                    max_caption_tokens=16, system_prompt=None, scheduler_shift=1.0)


def _train_and_save(module: L.LightningModule, data, path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def shapes_dirs(tmp_path_factory):
    """SHAPES_RUNS with a micro stage 0 base and stage 2 / 3 checkpoints one step from their init, SHAPES_WORLD with
    tiny shards, and a YAML overlay that shrinks the recipe's models and batches to them (its VQ: a small one)."""
    root = tmp_path_factory.mktemp("shapes4")
    runs, world = root / "runs", root / "world"
    base = write_micro_base(runs / "stage0_base" / "hf")
    vq = write_small_vq(root / "vq")
    _write_world(world, vq)
    L.seed_everything(1)
    _train_and_save(StackedARModule(base_path=str(base), vq_path=str(vq), log_images=0, **TINY_STACK),
                    loader(4, 4, with_codes=True), runs / "stage2_stacked_ar" / "checkpoints" / "last.ckpt")
    _train_and_save(DiffusionDecoderModule(vq_path=str(vq), **TINY_DECODER), loader(4, 4),
                    runs / "stage3_diffusion_decoder" / "checkpoints" / "last.ckpt")
    small_data = {"init_args": dict(resolution=IMAGE_SIZE, batch_size=2, val_batch_size=2, num_workers=0,
                                    shuffle_buffer=0)}
    overlay = {
        "model": {"init_args": {
            "stacked_ar": {"init_args": {"vq_path": str(vq), "compile_layers": False, **TINY_STACK}},
            "diffusion_decoder": {"init_args": {"vq_path": str(vq), **TINY_DECODER}},
        }},
        "data": {"init_args": {"components": {"t2i": small_data, "edit": small_data}}},
        "trainer": {"enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    return runs, world, root / "tiny.yaml"


@pytest.fixture
def shapes_env(shapes_dirs, monkeypatch):
    runs, world, _ = shapes_dirs
    monkeypatch.setenv("SHAPES_RUNS", str(runs))
    monkeypatch.setenv("SHAPES_WORLD", str(world))
    return shapes_dirs


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("joint", [False, True], ids=["from_stage2_and_3", "joint_from_scratch"])
def test_shapes_recipe_trains_both_kinds_validates_and_saves(joint, shapes_env, tmp_path):
    runs, _, tiny = shapes_env
    configs = (SHAPES4, SHAPES4_JOINT, tiny) if joint else (SHAPES4, tiny)
    cli = parse(*configs, overrides=("--trainer.max_steps", "4", "--trainer.val_check_interval", "4"))
    module = cli.model
    run_dir = runs / ("stage4_joint_from_scratch" if joint else "stage4_unified")
    assert Path(cli.trainer.default_root_dir) == run_dir
    assert (module.hparams.init_stack_from is None, module.hparams.init_decoder_from is None) == (joint, joint)
    assert module.autoregressive.hparams.base_path == str(runs / "stage0_base" / "hf")
    module.configure_model()
    stage2 = torch.load(runs / "stage2_stacked_ar" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    stage3 = torch.load(runs / "stage3_diffusion_decoder" / "checkpoints" / "last.ckpt",
                        weights_only=False)["state_dict"]
    for ours, theirs in ((module.autoregressive.stacked_ar.trainable_state_dict(),
                          _prefixed(stage2, "model.stacked_ar.")),
                         (module.diffusion.decoder.denoiser.state_dict(), _prefixed(stage3, "decoder.denoiser."))):
        assert ours.keys() == theirs.keys()
        same = all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert same != joint, "staged: the stage 2 / 3 weights; joint: each model's own initialisation"
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.callback_metrics
    for name in ("train/ce_t2i", "train/flow_t2i", "train/ce_edit", "train/flow_edit", "val/loss_t2i",
                 "val/loss_edit"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    after = module.state_dict()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"autoregressive",
                                                                                          "diffusion"}
    loaded = load_stage4(run_dir / "checkpoints" / "last.ckpt")
    assert loaded.stage3.vq is loaded.stage2.vq


class StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def test_shapes_recipe_resumes_exactly(shapes_env, tmp_path):
    """4 steps straight, against 2 steps then ``--ckpt_path last`` to 4: the same weights, optimizer states and
    step, bit for bit (the mixture's draws and both loaders' positions resume with the run)."""
    _, _, tiny = shapes_env
    args = lambda root, steps: ["--config", str(SHAPES4), "--config", str(tiny), *CPU,  # noqa: E731
                                "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
                                "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "2"]
    StarCLI(args=["fit", *args(tmp_path / "straight", 4)])
    StarCLI(args=["fit", *args(tmp_path / "resumed", 2)])
    cli = StarCLI(args=args(tmp_path / "resumed", 4), run=False)
    start = StartStep()
    cli.trainer.callbacks.append(start)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert start.step == 2, "the run went on from step 2"
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)
                         for run in ("straight", "resumed"))
    assert resumed["global_step"] == 4
    assert checkpoint_difference(straight, resumed) == 0.0
    two = torch.load(tmp_path / "resumed" / "checkpoints" / "step00000002.ckpt", weights_only=False)
    assert any(not torch.equal(v, two["state_dict"][k]) for k, v in straight["state_dict"].items()), \
        "steps 3 and 4 changed the weights, so equal weights say something"


def test_generate_and_edit_draw_with_a_stage4_checkpoints_stack_and_decoder(shapes_env, tmp_path):
    """``--ckpt`` / ``--decoder.ckpt`` take a stage 4 checkpoint: its own stack and DiT, not stage 2's / 3's."""
    from lit_star.commands.generate import edit, generate
    from lit_star.commands.options import PixelDecoder
    from lit_star.sampling.filtering import SamplerConfig

    runs, world, tiny = shapes_env
    StarCLI(args=["fit", "--config", str(SHAPES4), "--config", str(tiny), *CPU, "--trainer.default_root_dir",
                  str(tmp_path / "run"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    stage2 = torch.load(runs / "stage2_stacked_ar" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    stack = load_stage2(ckpt).stacked_ar.trainable_state_dict()
    dit = load_stage3(ckpt).decoder.denoiser.state_dict()
    for ours, prefix in ((stack, STAGE4_STACK_PREFIX), (dit, STAGE4_DECODER_PREFIX)):
        expected = _prefixed(state, prefix)
        assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)
    assert any(not torch.equal(stack[k], v) for k, v in _prefixed(stage2, "model.stacked_ar.").items()), \
        "stage 4 trained the stack, so stage 2's weights would be the wrong ones"

    decoder, sampler = PixelDecoder(kind="diffusion", ckpt=str(ckpt), steps=2), SamplerConfig(top_k=0)
    assert generate(str(ckpt), str(tmp_path / "samples"), prompt="a red circle", sampler=sampler,
                    decoder=decoder) == 0
    record = json.loads((tmp_path / "samples" / "generations.jsonl").read_text().splitlines()[0])
    assert record["settings"]["decoder_ckpt"] == str(ckpt)
    assert Image.open(tmp_path / "samples" / f"{record['id']}.png").size == (IMAGE_SIZE, IMAGE_SIZE)
    source = tmp_path / "source.png"
    source.write_bytes(_png(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)))
    assert edit(str(ckpt), str(source), "make it red", str(tmp_path / "edits"), sampler=sampler, decoder=decoder) == 0
    assert Image.open(tmp_path / "edits" / "edit_0.png").size == (IMAGE_SIZE, IMAGE_SIZE)


# ---- Table 11: the joint vs staged sweep, end to end on the tiny inputs ----------------------------------------


@pytest.mark.slow
def test_table_11_sweep_trains_the_staged_curriculum_and_the_joint_fit(shapes_env, tmp_path, monkeypatch):
    """recipes/sweeps/shapes_11_joint_vs_staged.yaml's own commands, shrunk to the tiny models and 2 steps a fit:
    the staged point trains stage 2 and stage 3 in its run directory and starts stage 4 from them; the joint
    point is one stage 4 fit from the base's layers and a fresh DiT. Evals need the world's eval sets: left out."""
    from lit_star.sweeps.collect import collect
    from lit_star.sweeps.launch import RunJob
    from lit_star.sweeps.prepare import prepare
    from lit_star.sweeps.spec import load_sweep

    _, _, tiny = shapes_env
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SHAPES_EVAL_WORLD", raising=False)
    vq = yaml.safe_load(tiny.read_text())["model"]["init_args"]["stacked_ar"]["init_args"]["vq_path"]
    small_data = {"init_args": {"resolution": IMAGE_SIZE, "batch_size": 2, "val_batch_size": 2, "num_workers": 0,
                                "shuffle_buffer": 0}}
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}
    tiny_stage = {
        "stage2": {"model": {"init_args": {"vq_path": vq, "compile_layers": False, **TINY_STACK}},
                   "data": small_data, "trainer": quiet},
        "stage3": {"model": {"init_args": {"vq_path": vq, **TINY_DECODER}}, "data": small_data, "trainer": quiet},
    }
    for name, overlay in tiny_stage.items():
        (tmp_path / f"tiny_{name}.yaml").write_text(yaml.safe_dump(overlay))
    two_steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--checkpoint.every_n_train_steps", "2"]

    def shrunk(argv: list[str], overlay: Path) -> list[str]:
        """The tiny overlay after the recipe files (the sweep's overrides still win), 2 steps last."""
        last_config = max(i for i, arg in enumerate(argv) if arg == "--config") + 2
        return [*argv[:last_config], "--config", str(overlay), *argv[last_config:], *two_steps]

    sweep = load_sweep(str(RECIPES / "sweeps" / "shapes_11_joint_vs_staged.yaml"))
    planned = [run for run in prepare(sweep, tmp_path / "sweep", check=False, log=lambda _: None) if run.seed == 0]
    assert [run.point for run in planned] == ["staged", "joint"]
    for run in planned:
        run.fit_argv = shrunk(run.fit_argv, tiny)
        for stage in run.stages:
            stage["fit_argv"] = shrunk(stage["fit_argv"], tmp_path / f"tiny_{stage['name']}.yaml")
        run.evals = []
        status = RunJob(run, threads=1)()
        assert status["state"] == "done", status.get("error")

    staged, joint = (Path(run.run_dir) for run in planned)
    assert list(read_steps(staged)) == ["stage2", "stage3", "fit"] and list(read_steps(joint)) == ["fit"]
    for stage in ("stage2", "stage3"):
        assert (staged / stage / "checkpoints" / "last.ckpt").is_file()
    # stage 4 of the staged point starts from its own stages' weights, not the SHAPES_RUNS ones
    stage4 = torch.load(staged / "checkpoints" / "last.ckpt", weights_only=False)
    assert stage4["hyper_parameters"]["init_stack_from"] == str(staged / "stage2" / "checkpoints" / "last.ckpt")
    assert stage4["hyper_parameters"]["init_decoder_from"] == str(staged / "stage3" / "checkpoints" / "last.ckpt")
    joint_ckpt = torch.load(joint / "checkpoints" / "last.ckpt", weights_only=False)
    assert joint_ckpt["hyper_parameters"]["init_stack_from"] is None and joint_ckpt["global_step"] == 2

    results = collect(tmp_path / "sweep", hparams_view=False)
    rows = {(row["point"], row["seed"]): row for row in results.runs}
    for point in ("staged", "joint"):
        for metric in ("val_ce_t2i", "val_flow_t2i", "val_ce_edit", "val_flow_edit"):
            assert np.isfinite(rows[(point, 0)][metric]), (point, metric)


def read_steps(run_dir: Path) -> dict:
    return json.loads((run_dir / "sweep" / "status.json").read_text())["steps"]
