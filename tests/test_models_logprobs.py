"""Log-prob gathering, collators and the shared-prompt pair forward, against float64 references."""
from types import SimpleNamespace

import pytest
import torch

import distalign.models.logprobs as logprobs_module
from distalign.models import (
    collate_pairs,
    collate_sequences,
    load_policy,
    make_tiny,
    pair_logps,
    sequence_logps,
    shared_prompt_mask,
    token_logps_from_logits,
)

ARCHS = ("llama", "qwen2", "gpt_neox")
PAD = 0
# Unequal prompt / chosen / rejected lengths, so rows pad differently and prompts end at different places.
SHAPES = [(5, 7, 3), (9, 2, 6), (3, 4, 4), (7, 1, 1)]


def random_pairs(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(5, 470, (n,), generator=g).tolist()
    return [SimpleNamespace(prompt_ids=draw(p), chosen_ids=draw(c), rejected_ids=draw(r)) for p, c, r in shapes]


def sharpen(model, seed=0):
    """Random init gives near-uniform attention; noise makes every output depend strongly on context,
    so a mask that leaks one token changes the log-probs by far more than the tolerance."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lp")
    first = make_tiny(root / "llama", arch="llama", hidden_size=32)
    paths = {"llama": first}
    for arch in ARCHS[1:]:
        paths[arch] = make_tiny(root / arch, arch=arch, hidden_size=32, tokenizer_dir=first)
    return {arch: sharpen(load_policy(path)).eval() for arch, path in paths.items()}


def float64_logps(model, prompt, response, temperature=1.0):
    """sum_t log softmax(z_t / T)[y_t] from a plain unpadded forward, in float64."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(prompt) - 1:].sum()


# ---- token_logps_from_logits -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_token_logps_equal_float64_log_softmax(dtype, tol):
    logits = (torch.randn(3, 5, 11, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, 11, (3, 5))
    labels[1, 2] = -100
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    expected[1, 2] = 0.0
    out = token_logps_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


def test_token_logps_temperature_and_chunks(monkeypatch):
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 2 * 7)  # one time step per chunk
    logits, labels = torch.randn(2, 4, 7, dtype=torch.float64), torch.randint(0, 7, (2, 4))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logps_from_logits(logits, labels, temperature=0.7), expected)


@pytest.mark.parametrize("chunk", [1 << 24, 2 * 5])
def test_token_logps_gradient(monkeypatch, chunk):
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", chunk)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 4], [0, 3, 3]])
    assert torch.autograd.gradcheck(lambda z: token_logps_from_logits(z, labels, 1.3), (logits,), fast_mode=True)
    # fp32 gradient equals the float64 gradient of log_softmax + gather
    z32 = logits.detach().float().requires_grad_()
    weights = torch.randn(2, 3)
    (token_logps_from_logits(z32, labels) * weights).sum().backward()
    z64 = logits.detach().clone().requires_grad_()
    ref = torch.log_softmax(z64, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * (labels >= 0)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=0, atol=1e-6)


def test_token_logps_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        token_logps_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="differ in"):
        token_logps_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


# ---- collators -----------------------------------------------------------------------------------------

def test_collate_sequences_layout():
    batch = collate_sequences([[5, 6], [7]], [[8], [9, 10, 11]], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 0], [7, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[False, False, True, False], [False, True, True, True]]
    assert batch["logits_from"] == 0
    with pytest.raises(ValueError, match="row 1: field 'response': empty"):
        collate_sequences([[5], [6]], [[7], []], PAD)


def test_collate_pairs_shared_layout_and_mask():
    pair = SimpleNamespace(prompt_ids=[5, 6], chosen_ids=[7, 8], rejected_ids=[9])
    short = SimpleNamespace(prompt_ids=[5, 6, 7], chosen_ids=[8], rejected_ids=[9])
    batch = collate_pairs([pair, short], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 2]   # rejected restarts after the prompt
    assert batch["segment_ids"][1].tolist() == [0, 0, 0, 1, 2]
    assert batch["logits_from"] == 1
    mask = shared_prompt_mask(batch["segment_ids"])[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]  # the rejected token sees the prompt, not the chosen tokens
    padded = collate_pairs([pair, SimpleNamespace(prompt_ids=[5], chosen_ids=[6], rejected_ids=[7])], PAD)
    assert shared_prompt_mask(padded["segment_ids"])[1, 0, 3].int().tolist() == [0, 0, 0, 1, 0]  # pad sees itself
    additive = shared_prompt_mask(batch["segment_ids"], torch.float32)[0, 0]
    assert additive[4, 2] == torch.finfo(torch.float32).min and additive[4, 1] == 0


# ---- model log-probs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_logps_equal_float64_unpadded_forward(models, arch):
    model = models[arch]
    pairs = random_pairs(1)
    prompts, responses = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs]
    with torch.no_grad():
        logps, token_logps, lengths = sequence_logps(model, collate_sequences(prompts, responses, PAD), 0.8)
        expected = torch.stack([float64_logps(model, p, r, 0.8) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=1e-4)
    assert lengths.tolist() == [len(r) for r in responses]
    assert token_logps[0, :len(prompts[0])].abs().sum() == 0 and token_logps.dtype == torch.float32


def test_temperature_scales_logits(models):
    model = models["llama"]
    batch = collate_sequences([[5, 6, 7]], [[8, 9]], PAD)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.double()
        _, hot, _ = sequence_logps(model, batch, temperature=2.0)
    expected = torch.log_softmax(logits[0, 2:4] / 2.0, -1)[[0, 1], [8, 9]]
    torch.testing.assert_close(hot[0, 3:5].double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_equals_two_rows(models, arch, attention):
    model = models[arch]
    model.config._attn_implementation = attention
    pairs = random_pairs(2)
    try:
        with torch.no_grad():
            shared = pair_logps(model, collate_pairs(pairs, PAD, share_prompt=True))
            rows = pair_logps(model, collate_pairs(pairs, PAD, share_prompt=False))
    finally:
        model.config._attn_implementation = "sdpa"
    for name in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"):
        torch.testing.assert_close(getattr(shared, name), getattr(rows, name), rtol=0, atol=1e-5)
    assert shared.rejected_lengths.tolist() == [r for _, _, r in SHAPES]


def test_shared_prompt_gradients_equal_two_rows(models):
    model = models["qwen2"]
    pairs = random_pairs(3)
    grads = []
    for share in (True, False):
        model.zero_grad()
        out = pair_logps(model, collate_pairs(pairs, PAD, share_prompt=share))
        (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_leaky_mask_is_detected(models, monkeypatch):
    """Sanity check of the exactness test: a plain causal mask (rejected sees chosen) is far off."""
    pairs = random_pairs(2)
    with torch.no_grad():
        rows = pair_logps(models["llama"], collate_pairs(pairs, PAD, share_prompt=False))
        monkeypatch.setattr(logprobs_module, "shared_prompt_mask",
                            lambda seg, dtype=None: shared_prompt_mask(torch.where(seg > 0, 1, seg), dtype))
        leaky = pair_logps(models["llama"], collate_pairs(pairs, PAD, share_prompt=True))
    assert (leaky.rejected_logps - rows.rejected_logps).abs().max() > 1e-2
    torch.testing.assert_close(leaky.chosen_logps, rows.chosen_logps, rtol=0, atol=1e-5)


def test_fallback_to_two_rows_without_4d_mask_support(models, monkeypatch):
    monkeypatch.setattr(logprobs_module, "SHARED_PROMPT_ATTENTION", ())
    pairs = random_pairs(4)
    with torch.no_grad():
        fallback = pair_logps(models["gpt_neox"], collate_pairs(pairs, PAD, share_prompt=True))
        rows = pair_logps(models["gpt_neox"], collate_pairs(pairs, PAD, share_prompt=False))
    torch.testing.assert_close(fallback.chosen_logps, rows.chosen_logps, rtol=0, atol=0)
    torch.testing.assert_close(fallback.rejected_logps, rows.rejected_logps, rtol=0, atol=0)


def test_bf16_model_gives_fp32_logps_close_to_fp32(models):
    model32 = models["llama"]
    model16 = load_policy(model32.config._name_or_path, dtype="bfloat16")
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    batch = collate_pairs(random_pairs(5), PAD)
    with torch.no_grad():
        out16, out32 = pair_logps(model16, batch), pair_logps(model32, batch)
    assert out16.chosen_logps.dtype == torch.float32 and out16.chosen_token_logps.dtype == torch.float32
    # bf16 has ~3 significant digits: a few percent on sums of ~10 token log-probs
    torch.testing.assert_close(out16.chosen_logps, out32.chosen_logps, rtol=0.05, atol=0.5)
