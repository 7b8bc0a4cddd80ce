"""A Qwen2-style tokenizer trained offline on a world's own text.

The real base (Qwen2.5-VL 3B/7B) ships its tokenizer; the tiny Shapes base needs one built here.
We train a byte-level BPE with the `tokenizers` library using exactly the normaliser, pre-tokeniser
and decoder that :class:`transformers.Qwen2TokenizerFast` rebuilds from ``vocab.json``/``merges.txt``,
then append Qwen's special tokens in Qwen's order. The result saves and reloads with plain
``AutoTokenizer.from_pretrained(dir)`` and renders conversations with a Qwen2.5-VL style chat template
(default system prompt, ``<|vision_start|><|image_pad|><|vision_end|>`` per image).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

# Qwen2.5's split regex (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Same tokens, same relative order as the Qwen2.5-VL tokenizer (there they start at id 151643).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
EXTRA_SPECIAL_TOKENS = tuple(t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_SCAFFOLD_TEXT = f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\nassistant\n"

# Qwen2.5-VL conversation format: an implicit default system turn, content given as a string or as a
# list of {"type": "image"|"video"|"text"} parts, and `add_generation_prompt` opening the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def train_qwen2_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2, model_max_length: int = 32768
) -> Qwen2TokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a Qwen2 tokenizer with Qwen's special tokens.

    ``vocab_size`` counts the BPE vocabulary (256 byte symbols included); the 20 special tokens come on top,
    so ``len(tokenizer) == vocab_size + 20`` once the corpus has enough merges to fill it.
    """
    if vocab_size <= 256:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("train_qwen2_tokenizer got no non-empty text")
    # The chat template's own words occur once per conversation; weighting them so keeps the system
    # prompt a handful of tokens instead of ~30 byte tokens in every training sequence.
    corpus += [CHAT_SCAFFOLD_TEXT] * len(corpus)
    bpe.train_from_iterator(corpus, trainer=trainer)

    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    # Specials go after the BPE vocabulary, as in Qwen, so their ids are fixed and contiguous.
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(EXTRA_SPECIAL_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of Qwen's special tokens in ``tokenizer``; raises naming any that is missing."""
    ids = {}
    for token in QWEN_SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise KeyError(f"tokenizer has no special token {token!r}")
        ids[token] = token_id
    return ids
