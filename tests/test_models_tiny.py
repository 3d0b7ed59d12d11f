"""Tiny models: real architectures that reload through Auto classes, a locally trained tokenizer."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from distalign.models import load_tokenizer, make_tiny, make_tiny_reward_model, train_tokenizer
from distalign.models.tiny import SHAPES, SPECIAL_TOKENS, default_corpus, tiny_config

ARCHS = ("llama", "qwen2", "gpt_neox")
EXPECTED_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    first = make_tiny(root / "llama", arch="llama", hidden_size=32)
    dirs = {"llama": first}
    for arch in ARCHS[1:]:
        dirs[arch] = make_tiny(root / arch, arch=arch, hidden_size=32, tokenizer_dir=first)
    return dirs


@pytest.mark.parametrize("arch", ARCHS)
def test_reloads_with_auto_class_and_special_ids(tiny_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    tok = load_tokenizer(tiny_dirs[arch])
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert (tiny_dirs[arch] / "model.safetensors").is_file()
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (512, 32, 2)
    assert cfg.pad_token_id == tok.pad_token_id == 0
    assert cfg.eos_token_id == tok.eos_token_id == 1 and cfg.bos_token_id == 1
    assert cfg.tie_word_embeddings == (arch != "gpt_neox")  # Pythia unties its output embedding
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_dirs):
    again = make_tiny(tmp_path / "again", arch="llama", hidden_size=32, tokenizer_dir=tiny_dirs["llama"])
    other = make_tiny(tmp_path / "other", arch="llama", hidden_size=32, seed=1, tokenizer_dir=tiny_dirs["llama"])
    reference = load_file(tiny_dirs["llama"] / "model.safetensors")
    same, different = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not torch.equal(reference["model.embed_tokens.weight"], different["model.embed_tokens.weight"])


def test_make_tiny_leaves_global_rng_alone(tmp_path, tiny_dirs):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny(tmp_path / "m", arch="gpt_neox", hidden_size=32, tokenizer_dir=tiny_dirs["llama"])
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_round_trip_digits_and_specials(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["llama"])
    text = "What is 12 + 7? The answer is 19.\nA small robot reads the book!"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert [t for t in tok.tokenize("1234") if t.strip("Ġ")] == ["1", "2", "3", "4"]
    assert [tok.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    assert len(tok) <= 512


def test_tokenizer_shared_by_tokenizer_dir(tiny_dirs):
    vocabs = [load_tokenizer(tiny_dirs[arch]).get_vocab() for arch in ARCHS]
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_chat_template(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["qwen2"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|eos|><|user|>2+2?<|eos|><|assistant|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>") and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    done = tok.apply_chat_template(messages + [{"role": "assistant", "content": "4"}], tokenize=False)
    assert done.endswith("<|assistant|>4<|eos|>")
    with pytest.raises(Exception, match="chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("arch", ("llama", "gpt_neox"))
def test_reward_model_has_one_label(tmp_path, tiny_dirs, arch):
    path = make_tiny_reward_model(tmp_path / "rm", arch=arch, hidden_size=32, tokenizer_dir=tiny_dirs["llama"])
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    scores = model(torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])).logits
    assert scores.shape == (2, 1)
    alone = model(torch.tensor([[8, 9]])).logits  # the head reads the last non-pad token
    torch.testing.assert_close(scores[1], alone[0], rtol=1e-5, atol=1e-5)


def test_config_and_vocab_errors(tmp_path):
    with pytest.raises(ValueError, match="arch: unknown architecture 'gpt2'"):
        make_tiny(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError, match="vocab_size: must be at least 261"):
        train_tokenizer(vocab_size=100)
    with pytest.raises(ValueError, match="hidden_size: 30 is not divisible by num_heads=4"):
        make_tiny(tmp_path / "y", hidden_size=30)


def test_custom_corpus_and_default_corpus_is_deterministic():
    assert default_corpus(50) == default_corpus(50)
    tok = train_tokenizer(300, corpus=["aaa bbb aaa bbb"] * 20)
    assert len(tok) <= 300 and tok.decode(tok("aaa bbb").input_ids) == "aaa bbb"
    assert "Ġbbb" in tok.get_vocab()  # merges learnt from the given corpus, not the default one


def test_qwen2_5_1_5b_shape_has_its_parameter_count_and_grouped_kv_heads():
    """The synthetic 1.5 B model of the memory recipe: Qwen2.5-1.5B's config, built on the meta device."""
    shape = dict(SHAPES["qwen2.5-1.5b"])
    arch, extra = shape.pop("arch"), {k: shape.pop(k) for k in ("rope_parameters", "rms_norm_eps")}
    config = tiny_config(arch, train_tokenizer(300), **shape)
    for key, value in extra.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304  # Qwen2.5-1.5B: 1.54 B, tied embeddings
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (1536, 256)  # 12 heads, 2 KV heads


def test_num_kv_heads_must_divide_num_heads():
    with pytest.raises(ValueError, match="num_kv_heads: 3 must divide num_heads=4"):
        tiny_config("llama", train_tokenizer(300), hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=None, vocab_size=300, max_position_embeddings=64, num_kv_heads=3)
