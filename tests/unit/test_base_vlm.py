"""The base VLM: world tokenizer, tiny Qwen2.5-VL, processor without torchvision, stage 0 module and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from lit_star.models import base_vlm
from lit_star.models.base_vlm import (
    IGNORE_INDEX,
    Qwen2_5_VLImageTextProcessor,
    build_image_processor,
    build_tiny_base_vlm,
    encode_chat,
    generate_answers,
    load_base_vlm,
    load_processor,
    save_base_vlm,
    tiny_spec,
)
from lit_star.models.tokenizer import QWEN_SPECIAL_TOKENS, special_token_ids, train_qwen2_tokenizer
from lit_star.checkpoints import export_base_checkpoint
from lit_star.eval.grading import normalize_answer
from lit_star.modules.base_module import task_batches

CORPUS = [
    "How many circles are there?",
    "What colour is the square?",
    "a red circle above a blue square",
    "two green triangles",
    "the colour of a lemon and the shape of a full moon",
    "a yellow circle",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_qwen2_tokenizer(CORPUS, vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Qwen2_5_VLImageTextProcessor(image_processor=build_image_processor("micro"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def micro_model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_base_vlm(tokenizer, "micro").eval()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_tokenizer_has_qwen_specials_after_bpe_and_qwen_chat_format(tokenizer, tmp_path):
    ids = special_token_ids(tokenizer)
    assert list(ids) == list(QWEN_SPECIAL_TOKENS)
    first = ids["<|endoftext|>"]
    assert list(ids.values()) == list(range(first, first + len(QWEN_SPECIAL_TOKENS))), "specials must follow the BPE vocab"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many circles?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The chat scaffold is learned as whole words, not spelled out byte by byte.
    assert "Ġhelpful" in tokenizer.tokenize(rendered)

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(rendered).input_ids == tokenizer(rendered).input_ids
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    text = "What colour is the hexagon? A purple one!"
    assert reloaded.decode(reloaded(text).input_ids) == text


@pytest.mark.parametrize("flavour, patch_grid, llm_tokens", [("tiny", 6, 9), ("micro", 8, 16)])
def test_vision_geometry_of_a_64px_world_image(tokenizer, flavour, patch_grid, llm_tokens):
    """tiny: upsampled to 96 px, 6 x 6 patches merged into one LLM token per cell of the 3 x 3 grid."""
    spec = base_vlm.TINY_FLAVOURS[flavour]
    assert sum(spec.mrope_section) == spec.head_dim // 2
    processor = Qwen2_5_VLImageTextProcessor(image_processor=build_image_processor(flavour), tokenizer=tokenizer)
    inputs = encode_chat(processor, ["How many circles?"], _images(1))
    assert inputs["image_grid_thw"].tolist() == [[1, patch_grid, patch_grid]]
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_token).sum()) == llm_tokens
    assert int(inputs["mm_token_type_ids"].sum()) == llm_tokens, "M-RoPE needs mm_token_type_ids on the image tokens"


def test_micro_forward_with_patch_merging(processor, micro_model):
    inputs = encode_chat(processor, ["How many circles?"], _images(1))
    with torch.no_grad():
        logits = micro_model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_labels_cover_only_answer_and_end_of_turn(processor):
    tok = processor.tokenizer
    answers = ["two", "a red circle above a blue square"]
    inputs = encode_chat(processor, ["How many circles?", "Describe the image."], _images(2), answers)
    for row, answer in enumerate(answers):
        labelled = inputs["labels"][row][inputs["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
    assert (inputs["labels"][inputs["attention_mask"] == 0] == IGNORE_INDEX).all()
    text_only = encode_chat(processor, ["the colour of a lemon"], None, ["a yellow circle"])
    assert "pixel_values" not in text_only
    assert tok.decode(text_only["labels"][0][text_only["labels"][0] != IGNORE_INDEX]) == "a yellow circle<|im_end|>"


def test_saved_directory_loads_like_a_released_qwen25vl(processor, micro_model, tmp_path):
    out = save_base_vlm(micro_model, processor, tmp_path / "base")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    ours = load_base_vlm(out).eval()
    ours_processor = load_processor(out)

    inputs = encode_chat(ours_processor, ["How many circles?", "What colour is the square?"], _images(2, seed=1))
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "the colour of a lemon"}], tokenize=False, add_generation_prompt=True
    )
    assert plain_tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    with torch.no_grad():
        reference = micro_model(**inputs).logits
        assert torch.equal(plain(**inputs).logits, reference)
        assert torch.equal(ours(**inputs).logits, reference)
    assert ours.state_dict().keys() == micro_model.state_dict().keys()
    assert all(torch.equal(v, micro_model.state_dict()[k]) for k, v in ours.state_dict().items())


def test_greedy_answers_stop_at_end_of_turn(processor, micro_model):
    answers = generate_answers(micro_model, processor, ["How many circles?", "x"], _images(2), max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    text_answers = generate_answers(micro_model, processor, ["the colour of a lemon"], None, max_new_tokens=4)
    assert len(text_answers) == 1


def test_submodule_accessors_name_the_transformers5_layout(micro_model):
    spec = base_vlm.TINY_FLAVOURS["micro"]
    assert len(base_vlm.decoder_layers(micro_model)) == spec.num_hidden_layers
    assert base_vlm.final_norm(micro_model) is micro_model.model.language_model.norm
    assert base_vlm.embed_tokens(micro_model) is micro_model.get_input_embeddings()
    assert base_vlm.lm_head(micro_model) is micro_model.get_output_embeddings()
    assert base_vlm.vision_tower(micro_model).merger is not None
    hidden = torch.zeros(1, 3, spec.hidden_size)
    position_ids = torch.arange(3).view(1, 1, 3).expand(3, 1, 3)
    cos, sin = base_vlm.rotary_embedding(micro_model)(hidden, position_ids)
    assert cos.shape == (1, 3, spec.head_dim) and sin.shape == cos.shape


def test_unknown_flavour_and_missing_directory_fail_clearly(tokenizer, tmp_path):
    with pytest.raises(KeyError, match="unknown tiny base flavour 'huge'"):
        build_tiny_base_vlm(tokenizer, "huge")
    with pytest.raises(KeyError, match="'vision_width'"):
        tiny_spec("tiny", {"vision_width": 96})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base_vlm(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_processor(tmp_path)


def test_task_batches_and_answer_normalisation():
    vqa = {"image": torch.zeros(1, 3, 64, 64), "question": ["q"], "answer": ["a"], "meta": [{}], "__key__": ["k"]}
    riddle = {"prompt": ["p"], "answer": ["a"], "meta": [{}], "__key__": ["r"]}
    assert [k for k, _ in task_batches(vqa)] == ["vqa"]
    assert [k for k, _ in task_batches({"vqa": vqa, "knowledge": riddle, "data_health": {}})] == ["vqa", "riddle"]
    with pytest.raises(KeyError, match="neither VQA"):
        list(task_batches({"caption": ["c"]}))
    assert normalize_answer("  A red  Circle. ") == normalize_answer("a red circle")
    assert normalize_answer("two") != normalize_answer("three")


def test_scene_descriptions_match_as_sets_and_break_down_by_field():
    from lit_star.eval.understanding import description_breakdown
    from lit_star.eval.grading import descriptions_match

    truth = "A gray background with a small red circle at the top left and a large blue star at the center."
    swapped = "A gray background with a large blue star at the center and a small red circle at the top left."
    assert descriptions_match(swapped, truth)
    assert not descriptions_match(truth.replace("small red", "large red"), truth)
    # Second object: right cell and shape, wrong size and colour; third answer names too few objects.
    wrong = "A gray background with a small red circle at the top left and a small green star at the center."
    short = "A white background with a small red circle at the center."
    parts = description_breakdown([(truth, truth), (wrong, truth), (short, truth), ("a red circle", truth)])
    assert parts == {"descriptions": 4, "background": 0.5, "object_count": 0.5, "objects": 8,
                     "per_object": {"cell": 4 / 8, "size": 4 / 8, "color": 4 / 8, "shape": 5 / 8}}
    with pytest.raises(ValueError, match="not a scene description"):
        description_breakdown([(truth, "a red circle")])
    empty = "A white background with nothing else."
    assert descriptions_match(empty, empty.lower()) and not descriptions_match(short, empty)
    assert description_breakdown([(short, empty)])["objects"] == 0


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from lit_star.worlds.shapes.generator import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(
        out,
        WorldConfig(t2i_train=0, t2i_val=0, vqa_train=64, vqa_val=8, edit_train=0, edit_val=0, knowledge_train=32,
                    knowledge_val=8, geneval_per_category=1, edit_eval_per_category=1, knowledge_eval_size=1),
        progress=False,
    )
    return out


def test_stage0_recipe_trains_validates_and_exports_a_loadable_base(small_world, tmp_path):
    from lit_star.training import StarCLI

    run = tmp_path / "run"
    shards = []
    for task in ("vqa", "knowledge"):
        for split in ("train", "val"):
            shards += [f"--data.init_args.components.{task}.init_args.{split}_shards", str(small_world / task / f"{split}-*.tar")]
    StarCLI(args=[
        "fit", "--config", "recipes/shapes/stage0_base.yaml", "--config", "recipes/trainer/cpu.yaml",
        "--trainer.default_root_dir", str(run), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.init_args.flavour", "micro",
        "--model.init_args.processor_fit_batches", "3", "--model.init_args.max_new_tokens", "3",
        "--model.init_args.warmup_steps", "1", *shards,
        "--model.init_args.flavour_overrides", "{vision_hidden_size: 48}", "--model.init_args.vision_lr_scale", "4",
        "--data.init_args.components.vqa.init_args.num_workers", "0",
        "--data.init_args.components.knowledge.init_args.num_workers", "0",
        "--data.init_args.components.vqa.init_args.val_batch_size", "4",
        "--data.init_args.components.knowledge.init_args.val_batch_size", "4",
    ])
    hf = run / "hf"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.vision_config.hidden_size == 48  # the flavour override reached the export
    groups = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == [5e-4, 2e-3]  # vision tower at 4x the recipe's LR
    assert tokenizer.chat_template and tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id

    # The export rebuilt from the last checkpoint alone is the same model.
    from_ckpt = export_base_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt")
    rebuilt = Qwen2_5_VLForConditionalGeneration.from_pretrained(from_ckpt).eval()
    processor = load_processor(from_ckpt)
    inputs = encode_chat(processor, ["How many circles are there?"], _images(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, model(**inputs).logits)

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "TensorBoard logs missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    for tag in ("train/loss", "val/vqa_accuracy", "val/riddle_accuracy", "val/vqa_exact_match"):
        assert tag in scalars, tag


def test_export_rejects_a_checkpoint_of_another_stage(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(KeyError, match="not a stage 0"):
        export_base_checkpoint(tmp_path / "other.ckpt", tmp_path / "out")


def test_pixel_statistics_centre_the_world_images():
    images = torch.full((2, 3, 8, 8), 0.8)  # a plain light background, in [-1, 1]
    images[:, 0, :4] = -1.0  # a dark red-channel stripe over half the rows
    mean, std = base_vlm.pixel_statistics([images])
    assert mean[0] == pytest.approx((0.0 + 0.9) / 2) and mean[1] == pytest.approx(0.9)
    assert std[0] > 0.4 and std[1] == pytest.approx(0.0, abs=1e-6)
    processor = build_image_processor("micro", mean, [max(s, 1e-3) for s in std])
    assert list(processor.image_mean) == mean
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        base_vlm.pixel_statistics([torch.zeros(2, 8, 8)])


@pytest.mark.parametrize("interleaved, order, fastest_turn", [
    (False, "thw", 1000 ** (-10 / 16)),  # contiguous [4, 6, 6]: w gets frequencies 10..15 of 16
    (True, "thw", 1000 ** (-2 / 16)),    # t, h, w, t, ...: w the third fastest
    (True, "wht", 1.0),                  # w first
])
def test_interleaved_mrope_gives_the_width_axis_usable_frequencies(tokenizer, interleaved, order, fastest_turn):
    # Through transformers' own rotary module: one column to the right must turn some rotary pair by
    # at least 0.3 rad, or a 3 x 3 token grid carries no left/right signal. Qwen's contiguous split at
    # head_dim 32 gives the width axis only the lowest frequencies (at most 0.0032 rad per column).
    spec = tiny_spec("tiny", {"interleaved_mrope": interleaved, "mrope_axis_order": order})
    model = Qwen2_5_VLForConditionalGeneration(base_vlm.tiny_config(tokenizer, spec))
    rotary = model.model.language_model.rotary_emb
    x = torch.zeros(1, 1, spec.hidden_size)
    positions = torch.tensor([[[5]], [[5]], [[5]]])
    next_column = torch.tensor([[[5]], [[5]], [[6]]])
    cos, sin = rotary(x, positions)
    cos_w, sin_w = rotary(x, next_column)
    turn = torch.atan2(sin_w * cos - cos_w * sin, cos_w * cos + sin_w * sin).abs().max().item()
    assert (turn > 0.3) == interleaved, turn
    assert turn == pytest.approx(fastest_turn, rel=1e-4)
    if order != "thw":
        # The other axes keep all their frequencies: the sections still cover the rotary half-dimension.
        assert sum(spec.mrope_section) == spec.head_dim // 2
        assert spec.mrope_section[:7] == [0, 0, 1, 0, 1, 0, 1]  # w, h, t


def test_mrope_axis_order_must_name_each_axis_once():
    for bad in ("tww", "th", "xyz"):
        with pytest.raises(ValueError, match="mrope_axis_order"):
            tiny_spec("tiny", {"mrope_axis_order": bad}).mrope_section
    with pytest.raises(ValueError, match="needs interleaved_mrope"):
        tiny_spec("tiny", {"interleaved_mrope": False, "mrope_axis_order": "wht"}).mrope_section
