"""Samplers and the grouped scoring forward: what is sampled, stored and scored must agree exactly."""
import pytest
import torch

from distalign.models import load_policy, load_tokenizer, make_tiny
from distalign.training.rollout import assemble_batch, grouped_response_forward, response_forward
from distalign.training.sampling import CachedSampler, filter_logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return {arch: make_tiny(root / arch, arch=arch, hidden_size=32, num_layers=2)
            for arch in ("llama", "qwen2", "gpt_neox")}


def grouped_prompts(tok, k):
    texts = ["What is 2 + 3?", "Hi", "Tell me a long story about seven small dogs"]
    return [tok(t)["input_ids"] for t in texts for _ in range(k)]


class RowsSeen:
    """Records the batch size of every forward call of a model."""

    def __init__(self, model):
        self.rows = []
        model.register_forward_pre_hook(lambda _, args, kwargs: self.rows.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_cached_sampler_stores_the_scoring_forwards_logprobs(models, arch):
    """One prefill per distinct prompt; the stored log-probs and entropies are the scoring forward's."""
    tok, model = load_tokenizer(models[arch]), load_policy(models[arch])
    seen = RowsSeen(model)
    torch.manual_seed(0)
    batch = CachedSampler(tok, max_new_tokens=8, temperature=0.7).sample(model, grouped_prompts(tok, 4))
    assert seen.rows[0] == 3 and set(seen.rows[1:]) == {12}
    scored = response_forward(model, batch, temperature=0.7, with_entropy=True)
    assert torch.allclose(batch.token_logps, scored.token_logps, atol=1e-5)
    assert torch.allclose(batch.entropy, scored.entropy, atol=1e-5)
    assert batch.token_logps.abs().sum() > 0


def force_eos(model, eos: int):
    """Makes EOS overwhelmingly likely at every position."""
    def hook(_, __, out):
        out.logits[..., eos] += 50.0
        return out
    model.register_forward_hook(hook)


def test_min_new_tokens_bans_eos_then_all_rows_stop(models):
    tok, model = load_tokenizer(models["llama"]), load_policy(models["llama"])
    force_eos(model, tok.eos_token_id)
    torch.manual_seed(0)
    batch = CachedSampler(tok, max_new_tokens=10, temperature=1.0, min_new_tokens=3).sample(
        model, grouped_prompts(tok, 2))
    response = batch.response_ids
    assert response.shape[1] == 4, "decoding stops once every row has produced EOS"
    assert (response[:, :3] != tok.eos_token_id).all() and (response[:, 3] == tok.eos_token_id).all()
    assert not batch.truncated.any() and batch.response_mask.sum().item() == 4 * len(response)
    # the stored log-prob of a forced token is that of the unrestricted distribution (EOS ~ certain)
    assert (batch.token_logps[:, :3] < -40).all() and batch.token_logps[:, 3].abs().max() < 1e-6


def test_inverse_cdf_draws_follow_the_tempered_distribution():
    sampler = CachedSampler.__new__(CachedSampler)
    sampler.eos, sampler.top_k, sampler.top_p, sampler.min_new_tokens = 3, 0, 1.0, 0
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    torch.manual_seed(0)
    draws = sampler.choose(probs.log().expand(40_000, 4), step=0)
    frequencies = torch.bincount(draws, minlength=4) / len(draws)
    assert torch.allclose(frequencies, probs, atol=0.01)  # binomial SE <= 0.0025
    assert frequencies[3] == 0


def test_filter_logits_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # softmax 0.644, 0.237, 0.087, 0.032
    keep = lambda out: torch.isfinite(out)[0].tolist()
    assert keep(filter_logits(logits, 2, 1.0)) == [True, True, False, False]
    assert keep(filter_logits(logits, 0, 0.7)) == [True, True, False, False]    # 0.644 < 0.7 <= 0.881
    assert keep(filter_logits(logits, 0, 0.5)) == [True, False, False, False]
    assert keep(filter_logits(logits, 0, 0.9)) == [True, True, True, False]


def responses_of_mixed_lengths(tok, model, k):
    """A sampled batch whose responses end at different positions (EOS written in)."""
    torch.manual_seed(1)
    batch = CachedSampler(tok, max_new_tokens=9, temperature=1.0).sample(model, grouped_prompts(tok, k))
    response = batch.response_ids.clone()
    response[response == tok.eos_token_id] = 5
    for row in range(len(response)):
        if row % 4:
            response[row, 1 + row % 8] = tok.eos_token_id
    P = batch.prompt_length
    return assemble_batch(batch.input_ids[:, :P], batch.attention_mask[:, :P], response, tok.eos_token_id)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_grouped_forward_equals_per_sample_rows(models, arch):
    """[prompt | c1..ck] in one row: same log-probs, values, entropies and gradients as k rows."""
    tok, model = load_tokenizer(models[arch]), load_policy(models[arch])
    k = 4
    batch = responses_of_mixed_lengths(tok, model, k)
    assert len(set(batch.response_mask.sum(-1).tolist())) > 3
    head = torch.nn.Linear(model.config.hidden_size, 1)
    seen = RowsSeen(model)
    grouped = grouped_response_forward(model, batch, k, 0.7, value_head=lambda h: head(h)[..., 0], with_entropy=True)
    assert seen.rows == [3], "one row per prompt"
    rows = response_forward(model, batch, 0.7, value_head=lambda h: head(h)[..., 0], with_entropy=True)
    for ours, theirs in [(grouped.token_logps, rows.token_logps), (grouped.values, rows.values),
                         (grouped.entropy, rows.entropy)]:
        assert torch.allclose(ours, theirs, atol=1e-5)
    weights = torch.randn_like(rows.token_logps)
    grad_grouped = torch.autograd.grad((grouped.token_logps * weights).sum(), list(model.parameters()))
    grad_rows = torch.autograd.grad((rows.token_logps * weights).sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grad_grouped, grad_rows))


def test_grouped_forward_falls_back_when_rows_are_not_groups(models):
    tok, model = load_tokenizer(models["llama"]), load_policy(models["llama"])
    batch = responses_of_mixed_lengths(tok, model, 2)           # rows: a a b b c c
    shuffled = batch.select(torch.tensor([0, 2, 1, 3, 4, 5]))  # a b a b c c: not runs of 2
    seen = RowsSeen(model)
    out = grouped_response_forward(model, shuffled, 2, 0.7)
    assert seen.rows == [6]
    assert torch.allclose(out.token_logps, response_forward(model, shuffled, 0.7).token_logps, atol=1e-6)
