"""Synthetic-language testbed: exact probabilities, DP vs brute force, sampling, KL, data, oracles."""
import math

import pytest
import torch
from scipy import stats

from distalign.data import load_examples
from distalign.testbed.lm import LMWorld, all_sequences, exact_kl, sequence_count, sequence_reward, tilt
from distalign.testbed.lm_data import (
    demonstrations,
    oracle_prefers,
    oracle_reward,
    oracle_reward_fn,
    oracle_win_rate,
    preference_pairs,
    prompt_rows,
    world_logprob_reward,
    write_world_datasets,
)
from distalign.testbed.lm_policy import (
    exact_win_rate,
    hf_policy_logprob_fn,
    kl_from_enumerated,
    kl_policy_to_target,
    kl_target_to_policy,
    mass_off_support,
    sampled_win_rate,
    target_logps,
    world_tokenizer,
)


@pytest.fixture(scope="module")
def world():
    return LMWorld.create(seed=0)


@pytest.fixture(scope="module")
def small_world():
    return LMWorld.create(seed=3, n_words=3, max_len=3, n_prompts=2, reward_scale=1.5)


def enumerated_logps(model, x: int, world):
    seqs = all_sequences(len(world.words), world.max_len)
    return seqs, model.logprob(torch.full((len(seqs),), x), seqs)


def test_sequence_space_is_enumerated_once():
    seqs = all_sequences(3, 3)
    assert len(seqs) == sequence_count(3, 3) == 3 + 9 + 27
    assert len({tuple(row) for row in seqs.tolist()}) == len(seqs)


@pytest.mark.parametrize("name", ["world", "small_world"])
def test_probabilities_sum_to_one(name, request):
    w = request.getfixturevalue(name)
    for x in range(len(w.prompts)):
        for model in (w.reference, w.target):
            _, logps = enumerated_logps(model, x, w)
            assert abs(float(logps.exp().sum()) - 1.0) < 1e-10


@pytest.mark.parametrize("beta", [1.0, 0.37])
def test_tilt_normaliser_and_conditionals_match_brute_force(small_world, beta):
    w = small_world
    tilted, log_z = tilt(w.reference, w.token_reward, beta)
    for x in range(len(w.prompts)):
        seqs, ref_logps = enumerated_logps(w.reference, x, w)
        reward = sequence_reward(w.token_reward, torch.full((len(seqs),), x), seqs)
        unnormalised = ref_logps + reward / beta
        assert abs(float(torch.logsumexp(unnormalised, 0)) - float(log_z[x])) < 1e-12
        _, tilted_logps = enumerated_logps(tilted, x, w)
        torch.testing.assert_close(tilted_logps, unnormalised - log_z[x], rtol=0, atol=1e-12)


def test_sampling_frequencies_match_exact_probabilities(small_world):
    w, n = small_world, 30_000
    tokens = w.target.sample(torch.ones(n, dtype=torch.long), torch.Generator().manual_seed(7))
    seqs, logps = enumerated_logps(w.target, 1, w)
    index = {tuple(row): i for i, row in enumerate(seqs.tolist())}
    counts = torch.zeros(len(seqs))
    for row in tokens.tolist():
        counts[index[tuple(row)]] += 1          # KeyError would mean an impossible sample
    expected = n * logps.exp()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, df=len(seqs) - 1) > 1e-4


def test_exact_kl_by_dp_equals_enumeration(small_world):
    w = small_world
    other = LMWorld.create(seed=11, n_words=3, max_len=3, n_prompts=2)
    for p, q in [(w.target, w.reference), (w.reference, w.target), (w.target, other.target)]:
        kl = exact_kl(p, q)
        for x in range(len(w.prompts)):
            _, lp = enumerated_logps(p, x, w)
            _, lq = enumerated_logps(q, x, w)
            assert abs(float((lp.exp() * (lp - lq)).sum()) - float(kl[x])) < 1e-12
    assert exact_kl(w.target, w.target).abs().max() == 0
    assert (exact_kl(w.target, w.reference) > 0.01).all()


def world_model_fn(world, model_name="reference"):
    return lambda prompts, responses: world.logprob(prompts, responses, model=model_name)


def test_policy_kl_by_enumeration_equals_dp(world):
    estimate = kl_target_to_policy(world, world_model_fn(world), batch_size=2000)
    assert estimate.exact and estimate.stderr == 0
    assert abs(estimate.value - float(exact_kl(world.target, world.reference).mean())) < 1e-12
    assert kl_target_to_policy(world, world_model_fn(world, "target")).value == pytest.approx(0, abs=1e-12)


def test_monte_carlo_kl_stderr_covers_exact(world):
    exact = float(exact_kl(world.target, world.reference).mean())
    estimate = kl_target_to_policy(world, world_model_fn(world), method="mc", n_samples=8000, seed=1)
    assert not estimate.exact and 0 < estimate.stderr < 0.05
    assert abs(estimate.value - exact) < 3 * estimate.stderr
    # the space is small enough that "auto" enumerates; a lower limit switches it to sampling
    assert not kl_target_to_policy(world, world_model_fn(world), max_enumerate=100, n_samples=64).exact


def test_reverse_kl_monte_carlo(world):
    prompts = [world.prompts[i % len(world.prompts)] for i in range(8000)]
    samples = world.sample_text(prompts, seed=4, model="reference")
    logps = world.logprob(prompts, samples, model="reference")
    value, stderr = kl_policy_to_target(world, prompts, samples, logps)
    assert abs(value - float(exact_kl(world.reference, world.target).mean())) < 3 * stderr


def label_z_score(world, rows, gamma, noise=0.0, margin_fn=None):
    """z of sum_i (1{chosen is the pair's higher-scored response} - P(that)) under the label model.

    Which response scores higher depends only on the unordered pair, not on the label, so each term
    has mean 0 under the model; a wrong gamma or noise level shifts P(that) = sigmoid(gamma |delta|).
    """
    prompts = [r["prompt"] for r in rows]
    margin_fn = margin_fn or world.logprob
    chosen, rejected = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    margin = margin_fn(prompts, chosen) - margin_fn(prompts, rejected)
    p = torch.sigmoid(gamma * margin.abs())
    p = (1 - noise) * p + noise * (1 - p)
    # exact ties happen (e.g. "pe mi pe pe" / "pe pe mi pe" share their bigrams): a fixed 1/2 each side
    hits = (margin > 0).double() + 0.5 * (margin == 0).double()
    return float((hits - p).sum() / torch.sqrt((p * (1 - p)).sum()))


@pytest.mark.parametrize("options", [{}, {"label_gamma": 3.0}, {"label_noise": 0.25},
                                     {"sampler": "target"}, {"preference_model": "reward"}])
def test_preference_labels_follow_their_model(world, options):
    rows = preference_pairs(world, 6000, seed=5, **options)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    gamma = options.get("label_gamma", world.gamma)
    margin_fn = world.token_reward_sum if options.get("preference_model") == "reward" else None
    assert abs(label_z_score(world, rows, gamma, options.get("label_noise", 0.0), margin_fn)) < 4
    if "label_gamma" in options or "label_noise" in options:   # power: the unswitched model is rejected
        assert abs(label_z_score(world, rows, world.gamma)) > 4


def test_demonstrations_and_prompts(world):
    demos = demonstrations(world, 500, seed=1)
    assert torch.isfinite(world.logprob([d["prompt"] for d in demos], [d["completion"] for d in demos])).all()
    rows = prompt_rows(world, 500, seed=1)
    assert {r["prompt"] for r in rows} == set(world.prompts)


def test_datasets_load_through_the_data_package(world, tmp_path):
    paths = write_world_datasets(world, tmp_path, n_pairs=300, n_demos=50, n_prompts=20, seed=2)
    pairs, report = load_examples(str(paths["pairs"]), "pairs")
    assert len(pairs) == 300 and report.rows_kept == 300
    demos, _ = load_examples(str(paths["demonstrations"]), "demonstrations")
    assert len(demos) == 50
    assert LMWorld.load(paths["world"]).to_dict() == world.to_dict()


def test_save_load_is_exact(world, tmp_path):
    world.save(tmp_path / "w.json")
    loaded = LMWorld.load(tmp_path / "w.json")
    assert torch.equal(loaded.target.cond_logp, world.target.cond_logp)
    (tmp_path / "bad.json").write_text('{"words": []}')
    with pytest.raises(ValueError, match="bad.json: missing field"):
        LMWorld.load(tmp_path / "bad.json")


def test_oracle_rewards_make_pi_star_optimal(world):
    prompts = [world.prompts[i % 8] for i in range(64)]
    texts = world.sample_text(prompts, seed=3)
    x = world.prompt_ids(prompts)
    token = torch.tensor(oracle_reward(world, prompts, texts, kind="token"), dtype=torch.float64)
    # RLHF optimum from pi0 with KL coefficient beta: log pi* = log pi0 + r/beta - log Z
    expected = world.logprob(prompts, texts, "reference") + token / world.beta - world.log_normaliser[x]
    torch.testing.assert_close(world.logprob(prompts, texts), expected, rtol=0, atol=1e-12)
    fn = oracle_reward_fn(world, kind="logprob", invalid_reward=-99.0)
    expected_first = float(world.logprob(prompts[:1], texts[:1]))
    assert fn(prompts[:2], [texts[0], "ka zz"], extra=1) == [expected_first, -99.0]
    with pytest.raises(ValueError, match="kind"):
        oracle_reward(world, prompts, texts, kind="nope")


def test_oracle_judge_and_win_rate(world):
    x = world.prompts[0]
    a, b = "ka lo", "mi"
    p = oracle_prefers(world, x, a, b)
    delta = float(world.logprob([x], [a]) - world.logprob([x], [b]))
    assert p == pytest.approx(1 / (1 + math.exp(-world.gamma * delta)), abs=1e-15)
    assert p + oracle_prefers(world, x, b, a) == pytest.approx(1.0, abs=1e-15)
    assert oracle_prefers(world, x, a, "not a word") == 1.0 and oracle_prefers(world, x, "", "qq") == 0.5
    prompts = [world.prompts[i % 8] for i in range(4000)]
    ours, theirs = world.sample_text(prompts, seed=8), world.sample_text(prompts, seed=9)
    rate, stderr = oracle_win_rate(world, prompts, ours, theirs)
    assert abs(rate - 0.5) < 4 * stderr         # pi* against itself: 1/2 by symmetry
    ref = world.sample_text(prompts, seed=9, model="reference")
    assert oracle_win_rate(world, prompts, ours, ref)[0] > 0.5


def test_text_errors_and_support(world):
    logps = world.logprob([world.prompts[0]] * 3, ["", "ka ka ka ka ka", "ka qq"])
    assert torch.isinf(logps).all()
    with pytest.raises(ValueError, match="prompt: 'unknown' is not one"):
        world.logprob(["unknown"], ["ka"])


def test_hf_policy_callback_matches_token_by_token(small_world):
    import transformers  # imported here: it takes seconds and only this test needs it
    torch.manual_seed(0)
    tokenizer = world_tokenizer(small_world)
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in small_world.words)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config).eval()
    fn = hf_policy_logprob_fn(model, tokenizer, batch_size=7)
    prompts, responses = small_world.prompts[:1] * 3, ["ka", "lo mi ka", "mi mi"]
    batched = fn(prompts, responses)
    for prompt, response, value in zip(prompts, responses, batched):
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        manual = sum(float(log_probs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
        assert float(value) == pytest.approx(manual, abs=1e-4)
    estimate = kl_target_to_policy(small_world, fn)
    assert estimate.exact and estimate.n_scored == 2 * 39
    assert math.isfinite(estimate.value) and estimate.value > 0


def _model_table(world, model) -> torch.Tensor:
    return torch.stack([enumerated_logps(model, x, world)[1] for x in range(len(world.prompts))])


def test_exact_win_rate_is_the_double_sum_over_responses(small_world):
    """W = mean_x [sum_a sum_b p(a) q(b) P*(a > b) + |p| q_off + p_off q_off / 2], summed here pair by pair;
    the policy leaks 30% of its mass off pi*'s support, which loses against text on it and ties with itself."""
    world = small_world
    leaky = _model_table(world, world.reference) + math.log(0.7)
    base = _model_table(world, world.target)
    target = target_logps(world)
    p_in, p_off, q_off = 0.7, 0.3, 0.0          # pi* has no mass off its own support
    expected = 0.0
    for x in range(len(world.prompts)):
        total = 0.0
        for a in range(target.shape[1]):
            for b in range(target.shape[1]):
                prefers = 1.0 / (1.0 + math.exp(-world.gamma * float(target[x, a] - target[x, b])))
                total += math.exp(leaky[x, a]) * math.exp(base[x, b]) * prefers
        expected += total + p_in * q_off + 0.5 * p_off * q_off
    expected /= len(world.prompts)
    assert exact_win_rate(world, leaky, base) == pytest.approx(expected, abs=1e-12)
    # against a leaky baseline the in-support mass of the policy wins the baseline's off-support 30%
    rate = exact_win_rate(world, base, leaky)
    assert rate == pytest.approx(1.0 - expected, abs=1e-12)
    assert exact_win_rate(world, leaky, leaky) == pytest.approx(0.5, abs=1e-12)
    assert mass_off_support(leaky) == pytest.approx(0.3, abs=1e-12) and mass_off_support(base) < 1e-12
    assert kl_from_enumerated(world, base).value == pytest.approx(0.0, abs=1e-12)


def test_exact_win_rate_agrees_with_sampled_oracle_win_rate(world):
    prompts = [world.prompts[i % 8] for i in range(20000)]
    ours = world.sample_text(prompts, seed=11, model="target")
    theirs = world.sample_text(prompts, seed=12, model="reference")
    rate, stderr = oracle_win_rate(world, prompts, ours, theirs)
    exact = exact_win_rate(world, _model_table(world, world.target), _model_table(world, world.reference))
    assert abs(rate - exact) < 4 * stderr and exact > 0.5


def test_world_logprob_reward_is_gamma_log_pi_star_through_the_reward_config(tmp_path):
    from distalign.rewards import build_reward
    from distalign.config.online import RewardSpec
    world = LMWorld.create(seed=2, n_words=4, max_len=3, n_prompts=2, gamma=2.0)
    world.save(tmp_path / "world.json")
    prompts = [world.prompts[0], world.prompts[1], world.prompts[0]]
    texts = world.sample_text(prompts[:2], seed=1) + ["ka ka ka ka"]        # the last one is too long
    values = world_logprob_reward(prompts, texts, world=str(tmp_path / "world.json"), invalid_reward=-7.0)
    expected = (2.0 * world.logprob(prompts[:2], texts[:2])).tolist() + [-7.0]
    assert values == pytest.approx(expected, abs=1e-12)
    spec = RewardSpec(kind="callable", path="distalign.testbed.lm_data:world_logprob_reward",
                      kwargs={"world": str(tmp_path / "world.json")})
    scores = build_reward([spec])(prompts, texts, [{}, {}, {}])
    assert scores.tolist() == pytest.approx(expected[:2] + [-30.0], abs=1e-5)


def test_sampled_win_rate_averages_to_the_exact_one(small_world):
    """Weighting each response's w(y) by pi(y) gives the exact W; pi's samples estimate it within 4 s.e.,
    and a policy against its own exact distribution reads 1/2."""
    world = small_world
    ref, target = _model_table(world, world.reference), _model_table(world, world.target)
    texts = world.decode(all_sequences(len(world.words), world.max_len))
    weighted = 0.0
    for x, prompt in enumerate(world.prompts):
        scores = [sampled_win_rate(world, [prompt] * 2, [t, t], target)[0] for t in texts]
        weighted += float(torch.tensor(scores, dtype=torch.float64) @ ref[x].exp())
    assert weighted / len(world.prompts) == pytest.approx(exact_win_rate(world, ref, target), abs=1e-12)
    prompts = [world.prompts[i % 2] for i in range(6000)]
    for model, table in (("reference", ref), ("target", target)):
        rate, stderr = sampled_win_rate(world, prompts, world.sample_text(prompts, seed=5, model=model), ref)
        assert abs(rate - exact_win_rate(world, table, ref)) < 4 * stderr
    off = sampled_win_rate(world, prompts[:2], ["ka ka ka ka ka", "qq"], ref)
    assert off == pytest.approx((0.0, 0.0), abs=1e-12)          # off the support loses against pi0's text
    with pytest.raises(ValueError, match="as many responses"):
        sampled_win_rate(world, prompts[:3], ["ka"], ref)


@pytest.mark.parametrize("n_words,max_len", [(3, 2), (4, 3), (2, 4)])
def test_sequence_index_inverts_all_sequences(n_words, max_len):
    from distalign.testbed.lm import sequence_index
    tokens = all_sequences(n_words, max_len)
    assert torch.equal(sequence_index(tokens, n_words), torch.arange(len(tokens)))
    assert torch.equal(sequence_index(tokens.flip(0), n_words), torch.arange(len(tokens)).flip(0))


def test_preference_wins_count_the_same_rows_as_preference_pairs(small_world):
    from distalign.testbed.lm_data import preference_wins
    rows = preference_pairs(small_world, 700, seed=4, label_noise=0.1)
    wins = preference_wins(small_world, 700, seed=4, label_noise=0.1)
    texts = small_world.decode(all_sequences(3, 3))
    expected = torch.zeros_like(wins)
    for row in rows:
        expected[small_world.prompts.index(row["prompt"]), texts.index(row["chosen"]), texts.index(row["rejected"])] += 1
    assert torch.equal(wins, expected) and wins.sum() == 700
    assert torch.diagonal(wins, dim1=-2, dim2=-1).sum() == 0          # a != b in every pair
