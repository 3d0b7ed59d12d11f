"""Tabular testbed: closed-form checks of the fits and the label statistics of every switch."""
import math

import pytest
import torch

from distalign.objectives import reverse_kl_optimum
from distalign.testbed import misspecification as ms
from distalign.testbed import tabular as tb
from distalign.testbed import tabular_fit as tf


@pytest.fixture(scope="module")
def problem():
    return tb.make_problem(n_contexts=3, n_responses=5, sigma=1.5, gamma=1.0, seed=3, ref_sigma=1.0)


def test_pmle_on_exact_expected_loss_recovers_target(problem):
    wins = tb.expected_wins(tb.uniform_mu(*problem.shape), tb.bt_pref_prob(problem.target_logps, 1.0))
    assert float(wins.sum()) == pytest.approx(1.0)
    fitted = tf.fit_one(tf.pmle_fit(wins[None], 1.0, prior=0.0))[0]
    assert torch.allclose(fitted, problem.target_logps, atol=1e-8)


def test_bt_reward_and_distillation_recover_gamma_log_target(problem):
    gamma = 2.0
    wins = tb.expected_wins(tb.uniform_mu(*problem.shape), tb.bt_pref_prob(problem.target_logps, gamma))[None]
    reward = tf.fit_one(tf.bt_reward_fit(wins, prior=0.0))
    centred = gamma * (problem.target_logps - problem.target_logps.mean(-1, keepdim=True))
    assert torch.allclose(reward[0], centred, atol=1e-7)
    distilled = tf.fit_one(tf.distill_fit(wins, reward, gamma))
    assert torch.allclose(distilled[0], problem.target_logps, atol=1e-7)


@pytest.mark.parametrize("beta,gamma", [(0.5, 1.0), (1.0, 0.0), (0.1, 2.0)])
def test_reverse_kl_fit_matches_hand_written_closed_form(problem, beta, gamma):
    fitted = tf.fit_one(tf.reverse_kl_fit(problem.reward[None], problem.ref_logps, beta, gamma))[0].exp()
    logits = beta / (beta + gamma) * problem.ref_logps + problem.reward / (beta + gamma)
    assert (fitted - torch.softmax(logits, -1)).abs().max() < 1e-8
    assert torch.allclose(reverse_kl_optimum(problem.ref_logps.exp(), problem.reward, beta, gamma),
                          torch.softmax(logits, -1), atol=1e-12)


def test_dpo_with_uniform_reference_equals_pmle(problem):
    gen = torch.Generator().manual_seed(0)
    wins = tb.sample_wins(tb.uniform_mu(*problem.shape), tb.bt_pref_prob(problem.target_logps), 500, 4, gen)
    uniform = torch.full_like(problem.ref_logps, -math.log(problem.shape[1]))
    pmle, dpo = tf.solve([tf.pmle_fit(wins), tf.dpo_fit(wins, uniform, 1.0)])
    assert torch.allclose(pmle, dpo, atol=1e-8)


def test_exact_metrics_by_hand():
    p = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert float(tb.kl(p, q)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert float(tb.preference_accuracy(q, q)) == 1.0
    assert float(tb.preference_accuracy(q, q.flip(-1))) == 0.0


def empirical_pref(pref, n=400_000, seed=0):
    """Share of labelled pairs in each cell (a, b) where a was chosen, from a large sample."""
    mu = tb.uniform_mu(pref.shape[0], pref.shape[1])
    wins = tb.sample_wins(mu, pref, n, 1, torch.Generator().manual_seed(seed))[0]
    return wins / (wins + wins.transpose(-1, -2))


def assert_labels_follow(pref, tolerance=0.02):
    """Every off-diagonal cell's empirical win rate within `tolerance` of the claimed P(a > b)."""
    off = ~torch.eye(pref.shape[-1], dtype=torch.bool).expand_as(pref)
    assert (empirical_pref(pref)[off] - pref[off]).abs().max() < tolerance


def test_gamma_mismatch_labels(problem):
    pref = ms.gamma_mismatch(problem, 3.0)
    gap = problem.target_logps[:, 0] - problem.target_logps[:, 1]
    assert torch.allclose(pref[:, 0, 1], torch.sigmoid(3.0 * gap))
    assert_labels_follow(pref)


def test_label_noise_labels(problem):
    clean = tb.bt_pref_prob(problem.target_logps, 1.0)
    noisy = ms.label_noise(clean, 0.2)
    assert torch.allclose(noisy, 0.8 * clean + 0.2 * (1 - clean))
    assert torch.allclose(ms.label_noise(clean, 0.5), torch.full_like(clean, 0.5))
    assert_labels_follow(noisy)
    with pytest.raises(ValueError, match="epsilon"):
        ms.label_noise(clean, 0.7)


def test_condorcet_annotators_make_a_cycle(problem):
    assert not ms.majority_cycle(ms.condorcet_annotators(problem, 0.0)).any()  # BT is transitive
    pref = ms.condorcet_annotators(problem, 8.0)
    assert ms.majority_cycle(pref).all()
    assert (pref[:, 0, 1] > 0.5).all() and (pref[:, 1, 2] > 0.5).all() and (pref[:, 2, 0] > 0.5).all()
    each = tb.bt_pref_prob(ms.annotator_logps(problem, 8.0), 1.0)
    assert not any(ms.majority_cycle(p).any() for p in each)  # every annotator alone is transitive
    assert_labels_follow(pref)
    empirical = empirical_pref(pref)
    assert (empirical[:, 0, 1] > 0.5).all() and (empirical[:, 1, 2] > 0.5).all() and (empirical[:, 2, 0] > 0.5).all()


def test_reward_bt_labels(problem):
    pref = ms.reward_bt(problem, 1.0)
    gap = problem.reward[:, 0] - problem.reward[:, 2]
    assert torch.allclose(pref[:, 0, 2], torch.sigmoid(gap))
    assert torch.allclose(ms.reward_bt(problem, 0.0), tb.bt_pref_prob(problem.target_logps, 1.0))
    assert_labels_follow(pref)


def test_context_gamma_labels(problem):
    pref = ms.context_gamma(problem, 1.0)
    gammas = ms.context_gammas(problem, 1.0)
    assert torch.allclose(gammas, torch.exp(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)))
    log_odds = torch.logit(pref[:, 0, 1])
    gap = problem.target_logps[:, 0] - problem.target_logps[:, 1]
    assert torch.allclose(log_odds / gap, gammas)
    assert_labels_follow(pref)


def test_restricted_mu_never_samples_uncovered(problem):
    mu = tb.restricted_mu(*problem.shape, 2)
    wins = tb.sample_wins(mu, tb.bt_pref_prob(problem.target_logps), 2000, 2, torch.Generator().manual_seed(1))
    assert float(wins.sum()) == 4000 and float(wins[..., 2:, :].sum() + wins[..., :, 2:].sum()) == 0
    with pytest.raises(ValueError, match="covered"):
        tb.restricted_mu(*problem.shape, 0)


def test_feature_reward_fit_recovers_a_linear_reward_by_hand():
    """K = 2, phi = (0, 1) in one context: the population BT optimum is theta = log(p / (1 - p))."""
    p = 0.8
    wins = torch.tensor([[[[0.0, 1 - p], [p, 0.0]]]], dtype=tb.DTYPE)      # (S, X, K, K): a1 beats a0 w.p. p
    features = torch.tensor([[[0.0], [1.0]]], dtype=tb.DTYPE)
    fit = tf.feature_reward_fit(wins, features)
    assert fit.theta.item() == pytest.approx(math.log(p / (1 - p)), abs=1e-9) and fit.grad_max < 1e-9
    assert fit.rewards.sum().item() == pytest.approx(0.0, abs=1e-12)       # centred per context


def test_feature_reward_fit_holds_a_realisable_target(problem):
    """pi* = softmax(phi theta*): from exact population pairs the linear class gives back gamma log pi*."""
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(*problem.shape, 3, generator=gen, dtype=tb.DTYPE)
    target = torch.log_softmax(features @ torch.tensor([1.0, -0.5, 0.3], dtype=tb.DTYPE), -1)
    pref = tb.bt_pref_prob(target, 0.5)
    wins = tb.expected_wins(tb.uniform_mu(*problem.shape), pref)[None]
    fit = tf.feature_reward_fit(wins, features)
    torch.testing.assert_close(torch.log_softmax(fit.rewards[0] / 0.5, -1), target, atol=1e-9, rtol=0)
