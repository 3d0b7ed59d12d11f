"""Tiny models of real architectures with a locally trained tokenizer (no Hub access needed).

    from distalign.models.tiny import make_tiny
    path = make_tiny("out/tiny-llama", arch="llama")          # tokenizer + random LlamaForCausalLM
    AutoModelForCausalLM.from_pretrained(path)                 # loads like any Hub checkpoint

Model hubs are unreachable on the build machines (SPEC §3), so tests and the embedded demo build
their models here: a byte-level BPE tokenizer trained with `tokenizers` on a deterministic generated
corpus, and a randomly initialised Llama / Qwen2 / GPT-NeoX from its real config class.

Tokenizer choices:
- digits are split one per token before BPE, so "12+7=19" tokenises as 1 2 + 7 = 1 9 and small
  arithmetic stays learnable by a tiny model;
- special tokens `<|pad|>`, `<|eos|>` (also the bos), `<|system|>`, `<|user|>`, `<|assistant|>`;
  nothing is added automatically (no post-processor): the data package appends EOS to responses;
- chat template: `<|role|>content<|eos|>` per message, `<|assistant|>` as the generation prompt;
- padding_side is "left": distalign's collators build their own right-padded batches, so the only
  user of the tokenizer's padding is batched `generate`, which needs left padding for decoder-only
  models (otherwise new tokens follow pad tokens).
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
ARCHITECTURES = ("llama", "qwen2", "gpt_neox")
BYTE_ALPHABET_SIZE = 256
# Real models' shapes with random weights, for memory and speed measurements of models that cannot be
# downloaded here. qwen2.5-1.5b: Qwen2.5-1.5B's config (1.54 B parameters, tied embeddings, q/k/v bias).
SHAPES = {
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a small robot", "the farmer", "our team",
             "the model", "a student", "the old man", "she", "he", "they", "we", "the bird"]
_VERBS = ["sees", "likes", "writes", "finds", "helps", "answers", "reads", "builds", "counts", "wants"]
_OBJECTS = ["the book", "a red apple", "the answer", "a long letter", "the river", "some water",
            "the question", "a new house", "the numbers", "a good idea", "the garden", "the sky"]
_ENDINGS = [".", " today.", " again.", " in the morning.", " very well.", " because it is kind.", "?", "!"]
_QUESTIONS = ["What is", "Please compute", "Tell me", "Can you add", "How much is"]


def default_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """A deterministic English-ish corpus: simple sentences, arithmetic lines and chat-like turns."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        kind = i % 3
        if kind == 0:
            lines.append(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
                         f"{rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}")
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
            lines.append(f"{rng.choice(_QUESTIONS)} {a} {op} {b}? The answer is {value}.")
        else:
            lines.append(f"Question: why does {rng.choice(_SUBJECTS)} like {rng.choice(_OBJECTS)}?\n"
                         f"Answer: because {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} it.")
    return lines


def train_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit pre-tokenisation, wrapped as a `PreTrainedTokenizerFast`."""
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size: must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) if corpus is not None else default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|eos|>",
        padding_side="left", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def tiny_config(arch: str, tokenizer, *, hidden_size: int, num_layers: int, num_heads: int,
                intermediate_size: int | None, vocab_size: int,
                max_position_embeddings: int, num_kv_heads: int | None = None) -> PretrainedConfig:
    """A real config of `arch` sized for tests; special-token ids taken from `tokenizer`. `num_kv_heads`
    (Llama / Qwen2: grouped-query attention) defaults to `num_heads`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size: {hidden_size} is not divisible by num_heads={num_heads}")
    kv_heads = num_kv_heads or num_heads
    if num_heads % kv_heads or (arch == "gpt_neox" and kv_heads != num_heads):
        raise ValueError(f"num_kv_heads: {kv_heads} must divide num_heads={num_heads} (and equal it for gpt_neox)")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    if arch == "gpt_neox":
        # Pythia-style: untied output embedding, parallel residual, 4x MLP.
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                             max_position_embeddings=max_position_embeddings, rotary_pct=0.25,
                             use_parallel_residual=True, tie_word_embeddings=False, **ids)
    # Llama / Qwen2: SwiGLU MLP of width ~8/3 h rounded up to a multiple of 16 (e.g. 256 -> 688);
    # tied embeddings because at this size the embedding dominates the parameter count.
    gated_width = intermediate_size or -(-(8 * hidden_size // 3) // 16) * 16
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=kv_heads, intermediate_size=gated_width,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=True, **ids)
    return LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)


def _tokenizer_for(vocab_size: int, corpus, tokenizer_dir) -> PreTrainedTokenizerFast:
    if tokenizer_dir is not None:
        return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    return train_tokenizer(vocab_size, corpus)


def _build(auto_class, out_dir, arch, hidden_size, num_layers, num_heads, intermediate_size, vocab_size,
           max_position_embeddings, seed, corpus, tokenizer_dir, num_kv_heads=None, tokenizer_vocab=None,
           dtype=torch.float32, **config_extra) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_for(tokenizer_vocab or vocab_size, corpus, tokenizer_dir)
    config = tiny_config(arch, tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         intermediate_size=intermediate_size, vocab_size=vocab_size,
                         max_position_embeddings=max_position_embeddings, num_kv_heads=num_kv_heads)
    for key, value in config_extra.items():
        setattr(config, key, value)
    # Seed the global generator only for the init, then restore it: callers' RNG streams stay untouched.
    # Built directly in `dtype`: a 1.5 B model is 3 GB in bf16 instead of 6 GB in fp32 then a copy.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def make_tiny(out_dir, arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
              intermediate_size: int | None = None, vocab_size: int = 512, max_position_embeddings: int = 512,
              seed: int = 0, corpus: Iterable[str] | None = None, tokenizer_dir=None, num_kv_heads: int | None = None,
              tokenizer_vocab: int | None = None, dtype: torch.dtype = torch.float32, **config_extra) -> Path:
    """Write a randomly initialised causal LM of `arch` plus its tokenizer to `out_dir`; return the path.

    `tokenizer_dir` reuses a saved tokenizer (so several models share one vocabulary) instead of
    training a new one of `tokenizer_vocab` tokens (default `vocab_size`) on `corpus` (default:
    `default_corpus()`); the model's vocabulary may be larger than the tokenizer's. `config_extra` sets
    further config fields (e.g. rope_theta). Same arguments -> same weights.
    """
    return _build(AutoModelForCausalLM, out_dir, arch, hidden_size, num_layers, num_heads, intermediate_size,
                  vocab_size, max_position_embeddings, seed, corpus, tokenizer_dir, num_kv_heads, tokenizer_vocab,
                  dtype, **config_extra)


def make_shaped(out_dir, shape: str, *, dtype: torch.dtype = torch.bfloat16, tokenizer_vocab: int = 512,
                seed: int = 0) -> Path:
    """A causal LM with the shapes of a real model (`SHAPES`) and random weights, saved in `dtype`, with a
    locally trained tokenizer of `tokenizer_vocab` tokens (the embedding keeps the real vocabulary size)."""
    if shape not in SHAPES:
        raise ValueError(f"shape: unknown {shape!r}; valid: {', '.join(SHAPES)}")
    return make_tiny(out_dir, **SHAPES[shape], seed=seed, tokenizer_vocab=tokenizer_vocab, dtype=dtype)


def make_tiny_reward_model(out_dir, arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2,
                           num_heads: int = 4, intermediate_size: int | None = None, vocab_size: int = 512,
                           max_position_embeddings: int = 512, seed: int = 0,
                           corpus: Iterable[str] | None = None, tokenizer_dir=None) -> Path:
    """Like `make_tiny`, but an `AutoModelForSequenceClassification` with one label (a scalar reward).

    HF sequence classifiers read the score at the last non-pad token, found through `pad_token_id`.
    """
    return _build(AutoModelForSequenceClassification, out_dir, arch, hidden_size, num_layers, num_heads,
                  intermediate_size, vocab_size, max_position_embeddings, seed, corpus, tokenizer_dir,
                  num_labels=1)
