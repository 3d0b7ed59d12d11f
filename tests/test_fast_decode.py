"""The lean decode step (`LlamaDecoder`) and its oneDNN matmuls: the same numbers as the model's own forward."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from distalign.models import ReferenceModel, load_policy, load_tokenizer, make_tiny
from distalign.models.fast_decode import LlamaDecoder
from distalign.models.onednn import linear, onednn_available
from distalign.training.rollout import left_pad, response_forward
from distalign.training.sampling import CACHE, CachedSampler, MixtureSampler, _ModelStep

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_decode")
    return {arch: make_tiny(root / arch, arch=arch, hidden_size=64, num_layers=2)
            for arch in ("llama", "qwen2", "gpt_neox")}


def variant(path, **config_changes):
    """A randomly initialised model of `path`'s architecture with some config fields changed."""
    config = AutoConfig.from_pretrained(path)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-zero biases (qwen2), so a dropped bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def models_under_test(paths):
    yield "llama", load_policy(paths["llama"]).eval()
    yield "qwen2 (q/k/v biases)", variant(paths["qwen2"])
    rope = AutoConfig.from_pretrained(paths["llama"]).rope_parameters
    yield "llama GQA + linear rope scaling", variant(paths["llama"], num_key_value_heads=2,
                                                     rope_parameters={**rope, "rope_type": "linear", "factor": 2.0})
    yield "mistral", AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mistral", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)).eval()


def prefill(model, prompts, extra, rows=None):
    """Left-padded prompts prefilled once each; by default every prompt is decoded as 2 rows (a group)."""
    ids, mask = left_pad(prompts, 0)
    rows = torch.arange(len(prompts)).repeat_interleave(2) if rows is None else rows
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    return getattr(out, CACHE), rows, mask


@torch.no_grad()
@pytest.mark.parametrize("rows", [None, [2, 0, 1, 0, 2, 2]], ids=["groups share their prompt", "rows in any order"])
def test_decoder_logits_equal_the_models_forward_at_every_step(paths, rows):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths: left padding
    rows = torch.arange(3).repeat_interleave(2) if rows is None else torch.tensor(rows)
    positions = torch.tensor([7, 2, 4]).index_select(0, rows)
    for name, model in models_under_test(paths):
        fast = LlamaDecoder.build(model, *prefill(model, prompts, 6, rows), extra=6)
        assert fast is not None, name
        slow = _ModelStep(model, *prefill(model, prompts, 6, rows), extra=6)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            tokens = torch.randint(3, 500, (6,), generator=gen)
            ours, theirs = fast(tokens, positions + step), slow(tokens, positions + step)
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (name, step, (ours - theirs).abs().max())
        with pytest.raises(RuntimeError, match="cache is full"):
            fast(tokens, positions + 6)


def test_sampler_draws_the_same_tokens_with_and_without_the_fast_step(paths):
    tok, model = load_tokenizer(paths["llama"]), load_policy(paths["llama"])
    prompts = [tok(t)["input_ids"] for t in ("What is 2 + 3?", "Hi", "Tell me a story") for _ in range(3)]
    batches = []
    for fast in (True, False):
        torch.manual_seed(0)
        batches.append(CachedSampler(tok, max_new_tokens=10, temperature=0.8, fast_decode=fast).sample(model, prompts))
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert torch.allclose(batches[0].token_logps, batches[1].token_logps, atol=1e-5)
    scored = response_forward(model, batches[0], temperature=0.8, with_entropy=True)
    assert torch.allclose(batches[0].token_logps, scored.token_logps, atol=1e-5)
    assert torch.allclose(batches[0].entropy, scored.entropy, atol=1e-5)


def test_mixture_sampler_decodes_a_frozen_reference_through_the_lean_step(paths, monkeypatch):
    tok, policy = load_tokenizer(paths["llama"]), load_policy(paths["llama"])
    frozen = load_policy(paths["llama"]).eval()
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    reference = ReferenceModel(policy, frozen)
    built, build = [], LlamaDecoder.build.__func__
    monkeypatch.setattr(LlamaDecoder, "build", classmethod(lambda cls, *a, **k: built.append(build(cls, *a, **k))
                                                             or built[-1]))
    prompts = [tok(t)["input_ids"] for t in ("What is 2 + 3?", "Hi") for _ in range(3)]
    batches = []
    for fast in (True, False):
        torch.manual_seed(0)
        batches.append(MixtureSampler(tok, 0.5, reference.context, max_new_tokens=8, temperature=1.0,
                                      fast_decode=fast).sample(policy, prompts))
    assert len(built) == 2 and all(d is not None for d in built), "policy and reference both on the lean step"
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert torch.allclose(batches[0].token_logps, batches[1].token_logps, atol=1e-5)


@torch.no_grad()
def test_decoder_declines_what_it_does_not_reproduce(paths):
    prompts = [[5, 6, 7], [8, 9]]

    def build(model, extra=4):
        return LlamaDecoder.build(model, *prefill(model, prompts, extra), extra=extra)

    assert build(load_policy(paths["gpt_neox"]).eval()) is None                       # another architecture
    assert build(load_policy(paths["llama"], lora={"r": 2, "alpha": 4}).eval()) is None  # LoRA layers
    hooked = load_policy(paths["llama"]).eval()
    hooked.lm_head.register_forward_hook(lambda *_: None)
    assert build(hooked) is None                                                      # hooks must run
    windowed = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mistral", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    assert build(windowed) is None                                                    # window < 3 + 4 tokens
    assert build(load_policy(paths["llama"]).eval()) is not None


@needs_onednn
def test_onednn_linear_matches_f_linear():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 17, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24)
    assert torch.allclose(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
    assert torch.equal(linear(x, weight, bias), linear(x, weight, bias)), "deterministic"
    xt = torch.randn(40, 9, generator=gen).t()  # a transposed (non-contiguous) input, no bias
    assert torch.allclose(linear(xt, weight), F.linear(xt, weight), atol=1e-5)


def test_onednn_linear_leaves_autograd_and_other_dtypes_to_torch():
    x64, w64 = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(linear(x64, w64), F.linear(x64, w64))
    x, w = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
    out = linear(x, w)
    assert out.requires_grad and torch.equal(out, F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w.detach()).dtype == torch.bfloat16


@torch.no_grad()
def test_a_finished_decoder_frees_its_cache_without_the_garbage_collector(paths):
    """No reference cycles: each rollout's cache and fused weights go as soon as the decoder does."""
    model = load_policy(paths["llama"]).eval()
    gc.disable()
    try:
        decoder = LlamaDecoder.build(model, *prefill(model, [[5, 6, 7]], 4), extra=4)
        decoder(torch.tensor([8, 8]), torch.tensor([3, 3]))
        cache, fused = weakref.ref(decoder.layers[0].keys), weakref.ref(decoder.layers[0].qkv.weight)
        del decoder
        assert cache() is None and fused() is None
    finally:
        gc.enable()


@torch.no_grad()
@pytest.mark.parametrize("precision", ["bf16 weights", "autocast, bf16 linears"])
def test_decoder_runs_in_bf16_like_the_models_forward(paths, precision):
    """Sampling runs in the training's precision (issue 15 §3): bf16 weights (`model.dtype=bfloat16`),
    or autocast over an fp32 model whose linears are bf16 (`bf16_linear_weights`, mixed_precision=bf16).
    The decoder's logits are bf16 and within bf16 rounding of the model's own forward in the same precision."""
    from distalign.training.common import bf16_linear_weights
    model = load_policy(paths["llama"]).eval()
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    else:
        bf16_linear_weights(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    positions = torch.tensor([7, 7, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "bf16 weights"):
        fast = LlamaDecoder.build(model, *prefill(model, prompts, 4), extra=4)
        slow = _ModelStep(model, *prefill(model, prompts, 4), extra=4)
        assert fast is not None
        for step in range(4):
            tokens = torch.tensor([20 + step, 30, 40, 50 + step])
            ours, theirs = fast(tokens, positions + step), slow(tokens, positions + step)
            assert ours.dtype == torch.bfloat16
            assert torch.allclose(ours.float(), theirs.float(), atol=0.05, rtol=0.02), (step, (ours - theirs).abs().max())
