"""StackedAR: frozen base, stack init, forward graph, sequence layout, chunked loss, full-size parameter counts."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from lit_star.models.ar_loss import PixelHead, chunked_cross_entropy, one_shot_cross_entropy
from lit_star.models.base_vlm import build_tiny_base_vlm, decoder_layers, final_norm
from lit_star.models.flavours import STACK_FLAVOURS, qwen2_5_vl_config
from lit_star.models.sequence_layout import (
    IGNORE_INDEX,
    SequenceLayout,
    collate_packed,
    collate_padded,
)
from lit_star.models.stacked_ar import StackedAR, base_state_checksum, load_stacked_ar, save_stacked_ar
from lit_star.models.tokenizer import train_qwen2_tokenizer

CORPUS = [
    "a red circle above a blue square",
    "two green triangles",
    "make the circle blue",
    "remove the square",
] * 20
CODEBOOK_SIZE, CODEBOOK_DIM = 32, 8
# micro vision tower: 8 px patches, 2x2 merge, temporal patch 2 -> 3*2*8*8 values per patch
VIT_GRID = torch.tensor([1, 4, 4])
VIT_PATCH_VALUES = 3 * 2 * 8 * 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_qwen2_tokenizer(CORPUS, vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def base(tokenizer):
    torch.manual_seed(0)
    return build_tiny_base_vlm(tokenizer, "micro")


def make_model(base, **kwargs) -> StackedAR:
    torch.manual_seed(1)
    kwargs = {"num_stack_layers": 1, "adapter_depth": 2, "codebook_size": CODEBOOK_SIZE, "codebook_dim": CODEBOOK_DIM} | kwargs
    return StackedAR(base, **kwargs)


@pytest.fixture(scope="module")
def layout(tokenizer, base):
    return SequenceLayout(tokenizer, base.config)


@pytest.fixture(scope="module")
def codebook():
    return torch.randn(CODEBOOK_SIZE, CODEBOOK_DIM, generator=torch.Generator().manual_seed(2))


def codes(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randint(0, CODEBOOK_SIZE, (n,), generator=torch.Generator().manual_seed(seed))


def run(model: StackedAR, batch, codebook) -> torch.Tensor:
    embeds = model.embed_inputs(batch.input_ids, batch.code_mask, codebook[batch.code_ids], batch.pixel_values, batch.image_grid_thw)
    return model(embeds, batch.position_ids, batch.attention_mask)


def edit_sample(layout, seed: int, unconditional: bool = False):
    pixels = torch.randn(int(VIT_GRID.prod()), VIT_PATCH_VALUES, generator=torch.Generator().manual_seed(seed))
    return layout.edit("make the circle blue", codes(seed), VIT_GRID, codes(seed + 1), pixels, unconditional=unconditional)


# ---- frozen base, gradients, init --------------------------------------------------------------------------


def test_optimizer_step_leaves_base_bit_identical_and_trains_adapter(base, layout, codebook):
    model = make_model(base).train()
    assert not model.base.training and model.stack.training, "base must stay in eval mode under model.train()"
    assert not any(p.requires_grad for p in model.base.parameters())
    checksum = base_state_checksum(model.base)
    batch = collate_padded([layout.text_to_image("a red circle", codes(0)), edit_sample(layout, 3)], layout.special.pad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model.image_token_loss(run(model, batch, codebook), batch.labels)
    loss.backward()
    # The adapter's only path to the loss goes through the frozen base, so this proves input gradients flow.
    for name, param in [*model.adapter.named_parameters(), *model.stack.named_parameters(), *model.pixel_head.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.base.parameters())
    stack_before = model.stack.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer.step()
    assert base_state_checksum(model.base) == checksum
    assert not torch.equal(stack_before, model.stack.layers[0].mlp.up_proj.weight)


def test_checksum_changes_with_one_element(base):
    state = {k: v.clone() for k, v in base.state_dict().items()}
    before = base_state_checksum(state)
    state["lm_head.weight"][3, 1] += 1e-6
    assert base_state_checksum(state) != before


def test_vlm_init_copies_base_last_layers(base):
    model = make_model(base, num_stack_layers=2)
    base_layers = decoder_layers(base)
    for i, layer in enumerate(model.stack.layers):
        source = base_layers[len(base_layers) - 2 + i]
        assert layer is not source and layer.self_attn.layer_idx == i
        for (name, ours), (_, theirs) in zip(layer.state_dict().items(), source.state_dict().items()):
            assert torch.equal(ours, theirs), name
        assert all(p.requires_grad for p in layer.parameters())
    assert torch.equal(model.stack.norm.weight, final_norm(base).weight)
    assert model.stack.norm.weight.data_ptr() != final_norm(base).weight.data_ptr()


def test_llm_init_copies_text_checkpoint_layers(base, tmp_path):
    text = base.config.text_config
    llm_config = Qwen2Config(
        vocab_size=100, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=3, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(5)
    llm = Qwen2ForCausalLM(llm_config)
    llm.save_pretrained(tmp_path / "llm")
    model = make_model(base, num_stack_layers=2, stack_init="llm", llm_path=tmp_path / "llm")
    for layer, source in zip(model.stack.layers, llm.model.layers[1:]):
        for (name, ours), (_, theirs) in zip(layer.state_dict().items(), source.state_dict().items()):
            assert torch.equal(ours, theirs), name
    wider = Qwen2ForCausalLM(Qwen2Config(**{**llm_config.to_dict(), "intermediate_size": 2 * text.intermediate_size}))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match="intermediate_size"):
        make_model(base, stack_init="llm", llm_path=tmp_path / "wider")


def test_rand_init_is_fresh_normal(base):
    model = make_model(base, num_stack_layers=2, stack_init="rand")
    weight = model.stack.layers[1].mlp.up_proj.weight
    assert not torch.equal(weight, decoder_layers(base)[-1].mlp.up_proj.weight)
    assert abs(weight.std().item() - base.config.text_config.initializer_range) < 0.005
    with pytest.raises(ValueError, match="stack_init"):
        make_model(base, stack_init="copy")


def test_save_load_round_trip_and_base_checksum_guard(base, layout, codebook, tmp_path):
    base.save_pretrained(tmp_path / "base")
    model = make_model(base).eval()
    save_stacked_ar(model, tmp_path / "run", tmp_path / "base")
    loaded = load_stacked_ar(tmp_path / "run").eval()
    batch = collate_padded([layout.text_to_image("two green triangles", codes(4))], layout.special.pad)
    with torch.no_grad():
        assert torch.equal(run(model, batch, codebook), run(loaded, batch, codebook))
    other = build_tiny_base_vlm(layout.tokenizer, "micro")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not the same base"):
        load_stacked_ar(tmp_path / "run", base_path=tmp_path / "other")


def test_stack_rope_theta_changes_only_the_stack_and_survives_save_load(base, layout, codebook, tmp_path):
    default, custom = make_model(base).eval(), make_model(base, stack_rope_theta=1e6).eval()
    half = default.stack.rotary_emb.inv_freq.shape[0]
    expected = 1.0 / (1e6 ** (torch.arange(half, dtype=torch.float32) * 2 / (2 * half)))
    torch.testing.assert_close(custom.stack.rotary_emb.inv_freq, expected)
    base_rotary = base.model.language_model.rotary_emb.inv_freq
    assert torch.equal(default.stack.rotary_emb.inv_freq, base_rotary)  # default: the base's theta
    assert custom.stack_rope_theta == 1e6 and default.stack_rope_theta == base.config.text_config.rope_parameters["rope_theta"]
    batch = collate_padded([layout.text_to_image("two green triangles", codes(4))], layout.special.pad)
    base.save_pretrained(tmp_path / "base")
    save_stacked_ar(custom, tmp_path / "run", tmp_path / "base")
    loaded = load_stacked_ar(tmp_path / "run").eval()
    with torch.no_grad():
        assert not torch.allclose(run(default, batch, codebook), run(custom, batch, codebook))  # same weights
        assert torch.equal(run(custom, batch, codebook), run(loaded, batch, codebook))
    with pytest.raises(ValueError, match="stack_rope_theta"):
        make_model(base, stack_rope_theta=0.0)


# ---- sequence layout ---------------------------------------------------------------------------------------


def test_text_to_image_layout_matches_hand_built(tokenizer, layout):
    special = layout.special
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    prompt = tokenizer.encode(text) + [special.vision_start]
    target = codes(7)
    sample = layout.text_to_image("a red circle", target.view(4, 4))
    n = len(prompt)
    assert sample.input_ids.tolist() == prompt + [special.vision_pad] * 15
    assert sample.code_mask.tolist() == [False] * n + [True] * 15
    assert sample.code_ids.tolist() == target[:15].tolist()
    # first code predicted at <|vision_start|>, code i predicts code i + 1
    assert sample.labels.tolist() == [IGNORE_INDEX] * (n - 1) + target.tolist()
    assert torch.equal(sample.position_ids, torch.arange(n + 15).expand(3, -1))
    assert not sample.mm_token_type_ids.any()


def test_unconditional_row_is_the_reference_layout(tokenizer, layout):
    special = layout.special
    cond = layout.text_to_image("two green triangles above a blue square", codes(1))
    uncond = layout.text_to_image("two green triangles above a blue square", codes(1), unconditional=True)
    n = len(layout.prompt_ids("two green triangles above a blue square"))
    assert len(uncond.input_ids) == len(cond.input_ids)
    ids = uncond.input_ids.tolist()
    assert ids[0] == cond.input_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[1 : n - 4] == [special.fim_pad] * (n - 5)
    assert tokenizer.convert_ids_to_tokens(ids[n - 4 : n]) == ["<|im_start|>", "assistant", "Ċ", "<|vision_start|>"]
    assert ids[n:] == cond.input_ids[n:].tolist()
    assert torch.equal(uncond.labels, cond.labels)


def test_cfg_dropout_draws_at_its_rate(tokenizer, base):
    layout = SequenceLayout(tokenizer, base.config, cfg_dropout=0.1)
    rng = random.Random(0)
    rate = sum(layout.draw_unconditional(rng) for _ in range(5000)) / 5000
    assert 0.09 < rate < 0.11


def test_edit_layout_and_mrope_positions(tokenizer, layout, base):
    special = layout.special
    sample = edit_sample(layout, 0)
    ids = sample.input_ids.tolist()
    header = list(special.user_header)
    start = next(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)
    n_vit = int(VIT_GRID.prod()) // 4
    expected_block = [special.vision_start, *[special.vision_pad] * 16, special.vision_end,
                      special.vision_start, *[special.image_pad] * n_vit, special.vision_end, *special.newline]
    assert ids[start : start + len(expected_block)] == expected_block
    assert tokenizer.decode(ids[start + len(expected_block) :]).startswith("make the circle blue<|im_end|>")
    assert sample.code_mask[start + 1 : start + 17].all() and sample.code_ids[:16].tolist() == codes(0).tolist()
    # transformers' own get_rope_index, given the ViT token types, on a real model
    types = (sample.input_ids == special.image_pad).int()
    expected, _ = base.model.get_rope_index(sample.input_ids[None], mm_token_type_ids=types[None], image_grid_thw=VIT_GRID[None])
    assert torch.equal(sample.position_ids, expected[:, 0])
    # reference semantics: only <|image_pad|> is 3-D (2 x 2 merged grid), VQ and generated tokens are 1-D
    vit = start + 1 + 16 + 2
    grid_pos = sample.position_ids[:, vit : vit + n_vit]
    assert grid_pos[0].tolist() == [vit] * 4 and grid_pos[1].tolist() == [vit, vit, vit + 1, vit + 1]
    assert grid_pos[2].tolist() == [vit, vit + 1, vit, vit + 1]
    after = sample.position_ids[:, vit + n_vit :]
    assert torch.equal(after, (torch.arange(after.shape[1]) + vit + 2).expand(3, -1))
    assert torch.equal(sample.position_ids[:, : vit], torch.arange(vit).expand(3, -1))
    # edit CFG blanks the text only: both image encodings stay
    uncond = edit_sample(layout, 0, unconditional=True)
    assert uncond.input_ids[start : start + len(expected_block)].tolist() == expected_block
    assert special.fim_pad in uncond.input_ids.tolist() and torch.equal(uncond.position_ids, sample.position_ids)


def test_padded_and_packed_batches_match_single_sequences(base, layout, codebook):
    model = make_model(base).eval()
    samples = [
        layout.text_to_image("a red circle", codes(0)),
        layout.text_to_image("two green triangles above a blue square", codes(1), unconditional=True),
        edit_sample(layout, 2),
    ]
    with torch.no_grad():
        singles = [run(model, collate_padded([s], layout.special.pad), codebook)[0] for s in samples]
        padded = run(model, collate_padded(samples, layout.special.pad), codebook)
        packed_batch = collate_packed(samples, row_length=120, pad_id=layout.special.pad)
        packed = run(model, packed_batch, codebook)
    assert packed_batch.attention_mask is None and packed_batch.position_ids.shape[0] == 4
    assert packed_batch.samples_per_row == [2, 1]
    for row, (single, sample) in enumerate(zip(singles, samples)):
        torch.testing.assert_close(padded[row, : len(sample.input_ids)], single, atol=1e-5, rtol=1e-5)
    offsets = [(0, 0), (0, len(samples[0].input_ids)), (1, 0)]
    for (row, offset), single, sample in zip(offsets, singles, samples):
        torch.testing.assert_close(packed[row, offset : offset + len(sample.input_ids)], single, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="longer than row_length"):
        collate_packed(samples, row_length=20, pad_id=layout.special.pad)


# ---- loss --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_loss_equals_one_shot_with_gradients(chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (3, 20), generator=gen)
    labels[:, :5] = IGNORE_INDEX
    labels[1, 12] = IGNORE_INDEX
    head = PixelHead(16, 300, chunk_size=chunk_size)
    results = []
    for loss_fn in (lambda: one_shot_cross_entropy(hidden, labels, head.weight, head.bias), lambda: head(hidden, labels)):
        hidden.grad = head.weight.grad = head.bias.grad = None
        loss = loss_fn()
        (3.0 * loss).backward()  # a non-unit upstream gradient
        results.append([loss.detach(), hidden.grad, head.weight.grad, head.bias.grad])
    for one_shot, chunked in zip(*results):
        assert (one_shot - chunked).abs().max() < 1e-5
    with torch.no_grad():
        assert abs(chunked_cross_entropy(hidden, labels, head.weight, head.bias, chunk_size).item() - results[0][0].item()) < 1e-5


def test_chunked_loss_rejects_unlabelled_batches_and_modules():
    head = PixelHead(4, 10)
    with pytest.raises(ValueError, match="no position"):
        head(torch.randn(2, 3, 4), torch.full((2, 3), IGNORE_INDEX))
    with pytest.raises(TypeError, match="PixelHead"):
        chunked_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), head)


# ---- full-size architectures on the meta device ------------------------------------------------------------


@pytest.mark.parametrize(
    "flavour, stack_params, adapter_params, head_params",
    [
        # 16 x Qwen2.5-VL-3B layers (77,076,992 each) + norm; adapter 512*2048+2048 + 2048^2+2048
        ("star-3b", 1_233_233_920, 5_246_976, 2048 * 65536 + 65536),
        # 14 x Qwen2.5-VL-7B layers (233,057,792 each) + norm; adapter 512*3584+3584 + 3 * (3584^2+3584)
        ("star-7b", 3_262_812_672, 40_384_512, 3584 * 65536 + 65536),
    ],
)
def test_meta_device_star_parameter_counts(flavour, stack_params, adapter_params, head_params):
    spec = STACK_FLAVOURS[flavour]
    with torch.device("meta"):
        base = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(spec.base_architecture))
        model = StackedAR(base, spec.num_stack_layers, spec.adapter_depth, spec.codebook_size, spec.codebook_dim)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.stack) == stack_params
    assert count(model.adapter) == adapter_params and model.adapter.depth == spec.adapter_depth
    assert count(model.pixel_head) == head_params
    # the bases are the public 3.75B / 8.29B Qwen2.5-VL architectures
    assert round(count(base) / 1e9, 2) == {"star-3b": 3.75, "star-7b": 8.29}[flavour]
    assert sorted(k.split(".")[2] for k in model.state_dict() if k.startswith("adapter.layers.") and k.endswith("weight")) == [
        str(i) for i in range(0, 2 * spec.adapter_depth, 2)
    ]


@pytest.mark.parametrize("stack_rope_theta", [None, 1e6])
def test_incremental_decoding_with_caches_matches_full_forward(base, layout, codebook, stack_rope_theta):
    model = make_model(base, num_stack_layers=2, stack_rope_theta=stack_rope_theta).eval()
    sample = layout.text_to_image("a red circle", codes(9))
    batch = collate_padded([sample], layout.special.pad)
    prefix = len(layout.prompt_ids("a red circle"))
    with torch.no_grad():
        full = model.logits(run(model, batch, codebook))
        embeds = model.embed_inputs(batch.input_ids, batch.code_mask, codebook[batch.code_ids])
        caches = model.new_caches()
        steps = [model.logits(model(embeds[:, :prefix], batch.position_ids[:, :, :prefix], caches=caches))]
        for t in range(prefix, len(sample.input_ids)):
            steps.append(model.logits(model(embeds[:, t : t + 1], batch.position_ids[:, :, t : t + 1], caches=caches)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert caches[1].get_seq_length() == len(sample.input_ids) and len(caches[1].layers) == 2
