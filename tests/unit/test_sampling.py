"""Sampling: KV-cached decoding, guidance, seeds, filtering, edit positions, reasoning, loading and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lit_star.models.base_vlm import decoder_layers, generate_answers, load_processor
from lit_star.models.sequence_layout import IGNORE_INDEX
from lit_star.models.stacked_ar import StackedAR, save_stacked_ar
from lit_star.models.vq import VQModel
from lit_star.sampling.decoding import DecodeOptions, decode_image_codes, decode_image_codes_without_cache
from lit_star.sampling.filtering import (
    SamplerConfig,
    filter_logits,
    full_sort_filter,
    guided_logits,
    make_generators,
    sample_next_tokens,
)
from lit_star.sampling.loading import load_star
from lit_star.sampling.modes import (
    Star,
    codes_to_images,
    edit_codes,
    edit_prefix,
    encode_source_image,
    generate_codes,
    reason_then_generate,
    text_to_image_prefix,
)
from tests.stage2_fixtures import build_micro_star, write_micro_base, write_small_vq

CORPUS = ["a red circle above a blue square", "two green triangles", "make the circle blue", "a yellow circle"] * 20
PROMPTS = ["a red circle", "two green triangles above a blue square", "a yellow circle", "make the circle blue"]
CODEBOOK_SIZE, CODEBOOK_DIM = 64, 8
IMAGE_SIZE = 8  # 2x VQ: 4 x 4 = 16 codes per image
SAMPLED = SamplerConfig(cfg_scale=3.0, temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def star() -> Star:
    star = build_micro_star(CORPUS, CODEBOOK_SIZE, CODEBOOK_DIM, IMAGE_SIZE)
    with torch.no_grad():  # distinct codebook vectors and a sharp head, so greedy codes vary along the image
        star.vq.quantize.embedding.weight.normal_()
        star.model.pixel_head.weight.mul_(20.0)
    return star


def _image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _decode(star, prefix, sampler, seeds=None, cached=True, options=DecodeOptions()):
    generators = None if sampler.greedy else make_generators(seeds)
    if cached:
        return decode_image_codes(star.model, star.codebook, prefix, star.num_tokens, sampler, generators, options)
    return decode_image_codes_without_cache(star.model, star.codebook, prefix, star.num_tokens, sampler, generators)


# ---- KV caches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cached_greedy_equals_uncached_token_for_token(star, cfg_scale):
    sampler = SamplerConfig(cfg_scale=cfg_scale, greedy=True)
    prefix = text_to_image_prefix(star.layout, PROMPTS[:2], sampler.uses_guidance)  # different lengths: left padding
    cached = _decode(star, prefix, sampler)
    assert torch.equal(cached, _decode(star, prefix, sampler, cached=False))
    assert len(set(cached[0].tolist())) > 2, "degenerate model: greedy codes should vary"


def test_greedy_codes_are_the_argmax_of_the_training_layout(star):
    """The decode loop sees the same sequence training does: teacher-forcing its own codes reproduces them."""
    sampler = SamplerConfig(cfg_scale=1.0, greedy=True)
    codes = generate_codes(star, PROMPTS[:1], sampler)
    sample = star.layout.text_to_image(PROMPTS[0], codes[0])
    embeds = star.model.embed_inputs(sample.input_ids[None], sample.code_mask[None], star.codebook(sample.code_ids))
    with torch.no_grad():
        hidden = star.model(embeds, sample.position_ids[:, None])
    predicted = star.model.logits(hidden[0][sample.labels != IGNORE_INDEX]).argmax(-1)
    assert torch.equal(predicted, codes.flatten())


def test_kv_cached_sampling_equals_uncached_and_static_cache(star):
    prefix = text_to_image_prefix(star.layout, PROMPTS[:3], guided=True)
    seeds = [5, 6, 7]
    cached = _decode(star, prefix, SAMPLED, seeds)
    assert torch.equal(cached, _decode(star, prefix, SAMPLED, seeds, cached=False))
    assert torch.equal(cached, _decode(star, prefix, SAMPLED, seeds, options=DecodeOptions(static_cache=True)))


def test_compiled_step_flag_runs_and_matches(star):
    # backend "eager" traces the step with dynamo (the flag's plumbing) without CPU code generation
    options = DecodeOptions(compile=True, compile_backend="eager")
    assert options.uses_static_cache
    prefix = text_to_image_prefix(star.layout, PROMPTS[:2], guided=True)
    sampler = SamplerConfig(cfg_scale=3.0, greedy=True)
    assert torch.equal(_decode(star, prefix, sampler, options=options), _decode(star, prefix, sampler))


# ---- guidance and seeds ----------------------------------------------------------------------------------


def test_cfg_one_equals_conditional_only_logits(star):
    model = star.model
    cond_only = text_to_image_prefix(star.layout, PROMPTS[:2], guided=False)
    doubled = text_to_image_prefix(star.layout, PROMPTS[:2], guided=True)

    def first_logits(prefix):
        embeds = model.embed_inputs(prefix.input_ids, prefix.code_mask, star.codebook(prefix.code_ids))
        with torch.no_grad():
            return model.logits(model(embeds, prefix.position_ids, prefix.attention_mask)[:, -1])

    cond_logits, doubled_logits = first_logits(cond_only), first_logits(doubled)
    torch.testing.assert_close(guided_logits(doubled_logits, 1.0), cond_logits, rtol=1e-5, atol=1e-5)
    # the unconditional rows differ, and w mixes them in
    assert not torch.allclose(doubled_logits[2:], cond_logits, atol=1e-3)
    u, c = doubled_logits[2:], doubled_logits[:2]
    torch.testing.assert_close(guided_logits(doubled_logits, 4.0), u + 4.0 * (c - u))
    greedy_w1 = SamplerConfig(cfg_scale=1.0, greedy=True)
    assert torch.equal(_decode(star, doubled, greedy_w1), _decode(star, cond_only, greedy_w1))


def test_unconditional_rows_follow_the_reference_layout(star):
    prefix = text_to_image_prefix(star.layout, PROMPTS[:1], guided=True)
    cond, uncond = prefix.input_ids[0].tolist(), prefix.input_ids[1].tolist()
    assert uncond[0] == cond[0] and uncond[-4:] == cond[-4:]
    assert set(uncond[1:-4]) == {star.layout.special.fim_pad}


def test_same_seed_same_codes_at_batch_size_1_and_4(star):
    seeds = [11, 12, 13, 14]
    together = generate_codes(star, PROMPTS, SAMPLED, seeds)
    alone = torch.cat([generate_codes(star, [p], SAMPLED, [s]) for p, s in zip(PROMPTS, seeds)])
    assert torch.equal(together, alone)
    shuffled = generate_codes(star, PROMPTS[::-1], SAMPLED, seeds[::-1])
    assert torch.equal(shuffled, together.flip(0))
    assert not torch.equal(generate_codes(star, PROMPTS[:1], SAMPLED, [99]), together[:1])


def test_sampling_needs_a_seed_per_sample(star):
    with pytest.raises(ValueError, match="one seed per sample"):
        generate_codes(star, PROMPTS[:2], SAMPLED, [1])


# ---- filtering -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k,top_p", [(1000, 0.8), (50, 1.0), (0, 0.5), (5000, 0.95), (1, 0.3)])
def test_top_k_first_filter_keeps_the_reference_set(top_k, top_p):
    logits = torch.randn(6, 65536, generator=torch.Generator().manual_seed(top_k)) * 3.0
    ours, reference = filter_logits(logits, top_k, top_p), full_sort_filter(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(reference))
    kept = torch.isfinite(ours)
    assert torch.equal(ours[kept], logits[kept])
    if top_k:
        assert int(kept.sum(-1).max()) <= top_k


def test_sampled_tokens_stay_in_the_kept_set_and_follow_the_distribution():
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0)) * 2.0
    config = SamplerConfig(cfg_scale=1.0, temperature=0.7, top_k=40, top_p=0.9)
    kept = torch.isfinite(filter_logits(logits / 0.7, 40, 0.9))
    generators = make_generators([0, 1])
    draws = torch.stack([sample_next_tokens(logits, config, generators) for _ in range(4000)])
    assert kept.gather(1, draws.T).all()
    expected = filter_logits(logits / 0.7, 40, 0.9).softmax(-1)[0]
    frequency = torch.bincount(draws[:, 0], minlength=300).float() / len(draws)
    assert (frequency - expected).abs().max() < 0.03
    greedy = SamplerConfig(greedy=True)
    assert torch.equal(sample_next_tokens(logits, greedy), logits.argmax(-1))


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplerConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplerConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplerConfig(top_k=-1)


# ---- editing ---------------------------------------------------------------------------------------------


def test_edit_decode_positions_equal_get_rope_index_of_the_full_sequence(star):
    source = encode_source_image(star, _image(0))
    assert source.codes.shape == (star.grid_size, star.grid_size)
    prefix = edit_prefix(star.layout, [source, source], ["make the circle blue", "remove it"], guided=True)
    special = star.layout.special
    n = star.num_tokens
    for row in range(prefix.input_ids.shape[0]):
        real = prefix.attention_mask[row].bool()
        ids = torch.cat([prefix.input_ids[row, real], torch.full((n - 1,), special.vision_pad)])
        # positions the decode loop uses: the prefix's, then one past the last for each generated token
        used = torch.cat([prefix.position_ids[:, row, real],
                          prefix.position_ids[:, row, -1:] + torch.arange(1, n)], dim=1)
        types = (ids == special.image_pad).int()
        expected, _ = star.model.base.model.get_rope_index(
            ids[None], mm_token_type_ids=types[None], image_grid_thw=source.image_grid_thw
        )
        assert torch.equal(used, expected[:, 0])
        assert (types.sum() > 0) and not torch.equal(expected[0, 0], expected[1, 0]), "M-RoPE must be 3-D on the ViT tokens"


def test_edit_cached_equals_uncached_and_training_layout(star):
    sampler = SamplerConfig(cfg_scale=2.0, greedy=True)
    images, instructions = [_image(1), _image(2)], ["make the circle blue", "remove the square"]
    codes = edit_codes(star, images, instructions, sampler)
    sources = [encode_source_image(star, image) for image in images]
    prefix = edit_prefix(star.layout, sources, instructions, guided=True)
    assert torch.equal(codes.flatten(1), _decode(star, prefix, sampler, cached=False))
    # conditional-only greedy codes teacher-forced through the training layout reproduce themselves
    plain = edit_codes(star, images[:1], instructions[:1], SamplerConfig(cfg_scale=1.0, greedy=True))
    sample = star.layout.edit(instructions[0], sources[0].codes, sources[0].image_grid_thw, plain[0], sources[0].pixel_values)
    embeds = star.model.embed_inputs(sample.input_ids[None], sample.code_mask[None], star.codebook(sample.code_ids),
                                     sample.pixel_values, sample.image_grid_thw)
    with torch.no_grad():
        hidden = star.model(embeds, sample.position_ids[:, None])
    assert torch.equal(star.model.logits(hidden[0][sample.labels != IGNORE_INDEX]).argmax(-1), plain.flatten())


# ---- reasoning, images -----------------------------------------------------------------------------------


def test_reasoning_passes_the_base_answer_through(star):
    prompts = ["the colour of a lemon", "two green triangles"]
    result = reason_then_generate(star, prompts, SAMPLED, [3, 4], suffix=" sharp", max_answer_tokens=6)
    answers = generate_answers(star.model.base, star.processor, prompts, max_new_tokens=6)
    assert result.answers == answers and all(answers)
    assert result.generation_prompts == [a + " sharp" for a in answers]
    assert torch.equal(result.codes, generate_codes(star, result.generation_prompts, SAMPLED, [3, 4]))


def test_codes_to_images_gives_rgb_images_of_the_trained_size(star):
    codes = torch.randint(0, CODEBOOK_SIZE, (2, star.grid_size, star.grid_size))
    images = codes_to_images(star.vq, codes)
    assert [image.size for image in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2 and images[0].mode == "RGB"
    pixels = torch.from_numpy(np.array(images[1])).permute(2, 0, 1).float() / 127.5 - 1
    decoded = star.vq.decode_codes(codes[1:]).clamp(-1, 1)[0]
    assert (pixels - decoded).abs().max() <= 1 / 127.5 + 1e-6


# ---- loading and commands --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    base_dir = write_micro_base(root / "base")
    vq_dir = write_small_vq(root / "vq")
    return root, base_dir, vq_dir


def _saved_stack(base_dir, vq_dir, out):
    from lit_star.models.base_vlm import load_base_vlm

    vq = VQModel.from_pretrained(vq_dir)
    torch.manual_seed(3)
    model = StackedAR(load_base_vlm(base_dir), num_stack_layers=1, adapter_depth=2,
                      codebook_size=vq.config.codebook_size, codebook_dim=vq.config.codebook_embed_dim)
    save_stacked_ar(model, out, base_dir)
    vq.save_pretrained(out / "vq")
    return model


def test_load_star_from_saved_directory_and_lightning_checkpoint(stage2_dirs):
    from lit_star.modules.stacked_ar_module import StackedARModule

    root, base_dir, vq_dir = stage2_dirs
    saved = _saved_stack(base_dir, vq_dir, root / "saved")
    unsized = load_star(root / "saved")  # enough to answer questions; generation needs the trained size
    with pytest.raises(ValueError, match="image size"):
        generate_codes(unsized, PROMPTS[:1], SamplerConfig(greedy=True))
    star = load_star(root / "saved", image_size=32)
    assert star.num_tokens == 64 and isinstance(star.processor.tokenizer.chat_template, str)
    for key, value in saved.trainable_state_dict().items():
        assert torch.equal(star.model.trainable_state_dict()[key], value), key
    half = load_star(root / "saved", image_size=8, stack_dtype=torch.bfloat16)
    assert half.model.pixel_head.weight.dtype == torch.bfloat16 and half.model.base.dtype == torch.float32
    assert generate_codes(half, PROMPTS[:2], SAMPLED, [0, 1]).shape == (2, 2, 2)

    # Trained with compiled layers (compilation itself waits for a first forward, so this costs nothing).
    module = StackedARModule(base_path=str(base_dir), vq_path=str(vq_dir), num_stack_layers=1, adapter_depth=2,
                             compile_layers=True)
    module.configure_model()
    with torch.no_grad():
        module.stacked_ar.adapter.layers[0].weight.add_(1.0)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                  "frozen_checksums": module.frozen_checksums, "datamodule_hyper_parameters": {"resolution": 32}}
    torch.save(checkpoint, root / "stage2.ckpt")
    from_ckpt = load_star(root / "stage2.ckpt")
    assert from_ckpt.image_size == 32
    for key, value in module.stacked_ar.trainable_state_dict().items():
        assert torch.equal(from_ckpt.model.trainable_state_dict()[key], value), key

    # A checkpoint written now carries its StackedAR config and loads without the module's hyper-parameters;
    # the one above (written before that entry existed) loaded from them.
    module.on_save_checkpoint(checkpoint)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, root / "stage2_config.ckpt")
    from_config = load_star(root / "stage2_config.ckpt")
    for key, value in module.stacked_ar.trainable_state_dict().items():
        assert torch.equal(from_config.model.trainable_state_dict()[key], value), key
    layers = [*decoder_layers(from_ckpt.model.base), *from_ckpt.model.stack.layers]
    assert all(layer._compiled_call_impl is None for layer in layers), "sampling must not run training-compiled layers"


def test_generate_edit_understand_commands(stage2_dirs, tmp_path):
    from lit_star.cli import main as cli

    root, base_dir, vq_dir = stage2_dirs
    ckpt = root / "cli_saved"
    _saved_stack(base_dir, vq_dir, ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "id": "red"}) + "\n"
                       + json.dumps({"prompt": "two green triangles", "seed": 7}) + "\n")
    out = tmp_path / "gen"
    common = ["--ckpt", str(ckpt), "--model.image_size", "16", "--sampler.top_k", "10"]  # 4 x 4 codes
    assert cli(["generate", *common, "--prompts", str(prompts), "--prompt", "[a yellow circle]", "--out", str(out),
                "--batch_size", "2", "--seed", "100", "--sampler.cfg_scale", "2.0"]) == 0
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["seed"]) for r in records] == [("00000", 100), ("red", 101), ("00002", 7)]
    assert all(Image.open(out / r["image"]).size == (16, 16) for r in records)
    assert records[0]["settings"]["cfg_scale"] == 2.0 and records[0]["settings"]["top_k"] == 10

    # batch size does not change an image with the same seed
    again = tmp_path / "gen1"
    assert cli(["generate", *common, "--prompts", str(prompts), "--prompt", "[a yellow circle]", "--out", str(again),
                "--batch_size", "1", "--seed", "100", "--sampler.cfg_scale", "2.0"]) == 0
    assert all(np.array_equal(np.asarray(Image.open(out / r["image"])), np.asarray(Image.open(again / r["image"])))
               for r in records)

    assert cli(["generate", *common, "--prompt", "[a red circle]", "--reasoning", "true", "--out", str(tmp_path / "reason"),
                "--max_answer_tokens", "4"]) == 0
    reasoned = json.loads((tmp_path / "reason" / "generations.jsonl").read_text())
    assert reasoned["generation_prompt"] == reasoned["answer"] + reasoned["settings"]["reasoning_suffix"]

    _image(0, 32).save(tmp_path / "in.png")
    assert cli(["edit", *common, "--image", str(tmp_path / "in.png"), "--instruction", "make it blue",
                "--num_images", "2", "--out", str(tmp_path / "edit")]) == 0
    edits = [json.loads(line) for line in (tmp_path / "edit" / "edits.jsonl").read_text().splitlines()]
    assert len(edits) == 2 and all((tmp_path / "edit" / e["image"]).is_file() for e in edits)

    assert cli(["understand", "--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"),
                "--question", "How many circles are there?", "--max_new_tokens", "8",
                "--out", str(tmp_path / "qa")]) == 0
    answer = json.loads((tmp_path / "qa" / "answers.jsonl").read_text())
    processor = load_processor(base_dir)
    expected = generate_answers(load_star(ckpt).model.base, processor, ["How many circles are there?"],
                                [np.asarray(Image.open(tmp_path / "in.png").convert("RGB"))], max_new_tokens=8)
    assert answer["answer"] == expected[0]


def test_generate_command_names_bad_prompt_records(stage2_dirs, tmp_path, capsys):
    from lit_star.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt key"}) + "\n")
    assert main(["generate", "--ckpt", str(stage2_dirs[0]), "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
