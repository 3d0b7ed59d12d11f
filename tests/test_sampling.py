"""Samplers and the grouped scoring forward: what is sampled, stored and scored must agree exactly."""
import pytest
import torch

from distalign.models import ReferenceModel, load_policy, load_tokenizer, make_tiny
from distalign.training.rollout import assemble_batch, grouped_response_forward, response_forward
from distalign.training.sampling import CachedSampler, MixtureSampler, filter_logits


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


def biased(model, token: int, amount: float):
    """Adds `amount` to one token's logit at every position, so that two copies of a model disagree."""
    def hook(_, __, out):
        out.logits[..., token] += amount
        return out
    model.register_forward_hook(hook)
    return model


def policy_and_reference(path, seed=0):
    """A policy and a frozen reference that differ in every weight and strongly on tokens 7 and 9."""
    policy, frozen = biased(load_policy(path), 7, 6.0), biased(load_policy(path), 9, 6.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, ReferenceModel(policy, frozen.eval())


def response_logits(model, batch, temperature):
    """Full-forward log-probs (B, T, V) of the tempered distribution at each response position."""
    P, T = batch.prompt_length, batch.response_mask.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits[:, P - 1:P - 1 + T]
    return (logits.double() / temperature).log_softmax(-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_mixture_sampler_stores_the_renormalised_geometric_mixture(models, arch):
    """beta = 0: the policy's scoring-forward log-probs; beta = 1: the reference's; beta = 0.5: the per-token
    log_softmax(0.5 log pi + 0.5 log pi_ref) from two full forwards. Each model prefills each prompt once."""
    tok = load_tokenizer(models[arch])
    policy, reference = policy_and_reference(models[arch])
    seen_policy, seen_ref = RowsSeen(policy), RowsSeen(reference.frozen)
    prompts, T = grouped_prompts(tok, 4), 0.7
    for mixture in (0.0, 1.0, 0.5):
        torch.manual_seed(0)
        batch = MixtureSampler(tok, mixture, reference.context, max_new_tokens=8, temperature=T).sample(
            policy, prompts)
        assert batch.token_logps.abs().sum() > 0
        if mixture in (0.0, 1.0):
            scorer = policy if mixture == 0.0 else reference.frozen
            with torch.no_grad():
                scored = response_forward(scorer, batch, temperature=T).token_logps
            assert torch.allclose(batch.token_logps, scored, atol=1e-5)
        mixed = ((1 - mixture) * response_logits(policy, batch, T)
                 + mixture * response_logits(reference.frozen, batch, T)).log_softmax(-1)
        expected = mixed.gather(-1, batch.response_ids[..., None])[..., 0] * batch.response_mask
        assert torch.allclose(batch.token_logps.double(), expected, atol=1e-5)
        assert seen_policy.rows[0] == seen_ref.rows[0] == 3 and set(seen_ref.rows[1:]) <= {12}
        seen_policy.rows.clear(), seen_ref.rows.clear()


def test_mixture_sampler_draws_follow_the_mixture(models):
    """4,000 first tokens at beta = 0.5: the policy puts ~0.44 on token 7, the reference ~0.44 on token 9;
    the mixture gives each ~0.03. Frequencies of {7, 9, rest} within 4 binomial SEs of the mixture's."""
    tok = load_tokenizer(models["llama"])
    policy, reference = policy_and_reference(models["llama"])
    prompt = tok("Hi")["input_ids"]
    torch.manual_seed(0)
    batch = MixtureSampler(tok, 0.5, reference.context, max_new_tokens=1, temperature=1.0).sample(
        policy, [prompt] * 4000)
    single = assemble_batch(batch.input_ids[:1, :-1], batch.attention_mask[:1, :-1],
                            batch.response_ids[:1], tok.eos_token_id)
    mixed = 0.5 * response_logits(policy, single, 1.0) + 0.5 * response_logits(reference.frozen, single, 1.0)
    probs = mixed.log_softmax(-1)[0, 0].exp()
    expected = torch.stack([probs[7], probs[9], 1 - probs[7] - probs[9]])
    first = batch.response_ids[:, 0]
    observed = torch.stack([(first == 7).double().mean(), (first == 9).double().mean(),
                            ((first != 7) & (first != 9)).double().mean()])
    stderr = (expected * (1 - expected) / len(first)).sqrt()
    assert 0.01 < expected[0] < 0.1 and 0.01 < expected[1] < 0.1
    assert ((observed - expected).abs() < 4 * stderr).all(), (observed, expected)


def test_mixture_sampler_with_a_lora_policy_uses_the_adapter_free_reference(models):
    """A LoRA policy's reference is the same module with the adapter off, switched per forward."""
    tok = load_tokenizer(models["llama"])
    base, policy = load_policy(models["llama"]), load_policy(models["llama"], lora={"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    reference = ReferenceModel.for_policy(policy)
    for mixture, scorer in ((1.0, base), (0.0, policy)):
        torch.manual_seed(0)
        batch = MixtureSampler(tok, mixture, reference.context, max_new_tokens=6, temperature=1.0).sample(
            policy, grouped_prompts(tok, 2))
        with torch.no_grad():
            scored = response_forward(scorer, batch, temperature=1.0).token_logps
        assert torch.allclose(batch.token_logps, scored, atol=1e-5)
    with torch.no_grad():   # the adapter is on again after sampling
        assert not torch.allclose(response_forward(policy, batch).token_logps,
                                  response_forward(base, batch).token_logps, atol=1e-3)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` package recording what the sampler sends: the V1 engine's in-process layout,
    three fixed tokens then EOS per request."""
    import sys
    import types
    from types import SimpleNamespace

    seen = {}

    class LLM:
        def __init__(self, model, gpu_memory_utilization):
            runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda w: seen.update(weights=dict(w))))
            worker = SimpleNamespace(model_runner=None, worker=SimpleNamespace(model_runner=runner))
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))

        def generate(self, prompts, params, use_tqdm):
            seen["prompts"], seen["params"] = prompts, params
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6, 7, self.eos])]) for _ in prompts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: prompt_token_ids
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return LLM, seen


def test_vllm_requests_are_seeded_from_each_rows_draws(models, fake_vllm):
    from distalign.training.sampling import VLLMSampler, row_seeds
    LLM, seen = fake_vllm
    tok, model = load_tokenizer(models["llama"]), load_policy(models["llama"])
    LLM.eos = tok.eos_token_id
    sampler = VLLMSampler(tok, models["llama"], max_new_tokens=4, temperature=0.7, top_k=5)
    prompts = grouped_prompts(tok, 2)
    draws = torch.rand(len(prompts), 4, generator=torch.Generator().manual_seed(0))
    batch = sampler.sample(model, prompts, draws)
    seeds = [p["seed"] for p in seen["params"]]
    assert seeds == row_seeds(draws) and len(set(seeds)) == len(prompts)
    assert seen["params"][0] == {"temperature": 0.7, "top_k": 5, "top_p": 1.0, "max_tokens": 4, "min_tokens": 0,
                                 "stop_token_ids": [tok.eos_token_id], "seed": seeds[0]}
    assert batch.response_mask.sum(-1).tolist() == [4] * len(prompts)  # up to and including EOS
    sampler.sample(model, prompts, draws.clone())
    assert [p["seed"] for p in seen["params"]] == seeds  # the same draws (a resumed step): the same seeds
    sampler.sample(model, prompts)
    assert "seed" not in seen["params"]  # no draws: one unseeded request setting for all


def test_vllm_weight_sync_folds_a_lora_adapter_into_base_names(models, fake_vllm):
    import copy

    from distalign.training.sampling import VLLMSampler
    LLM, seen = fake_vllm
    tok = load_tokenizer(models["llama"])
    LLM.eos = tok.eos_token_id
    base = load_policy(models["llama"])
    policy = load_policy(models["llama"], lora={"r": 4, "alpha": 8})
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    VLLMSampler(tok, models["llama"], max_new_tokens=4, temperature=1.0).sync_weights(policy)
    want = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert seen["weights"].keys() == base.state_dict().keys() == want.keys()
    for k in want:
        torch.testing.assert_close(seen["weights"][k], want[k], msg=k)
    assert any(not torch.equal(want[k], base.state_dict()[k]) for k in want)  # the adapter did change weights
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())  # the policy is untouched


def test_vllm_engine_without_an_in_process_model_gives_a_clear_error():
    from types import SimpleNamespace

    from distalign.training.sampling import engine_model
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        engine_model(SimpleNamespace(llm_engine=SimpleNamespace()))  # V1 with its engine core in another process
