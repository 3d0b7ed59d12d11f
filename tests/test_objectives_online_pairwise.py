"""Online pairwise objectives against independent float64 formulas, gradient checks, and the
score-function estimators' (KL, Nash-MD-PG) means against exact tabular gradients."""
import math

import pytest
import torch

from distalign.objectives import kl_estimate, score_function_kl
from distalign.objectives.online_pairwise import (aihf_reward_loss, geometric_mixture, nash_md_objective,
                                                   nash_md_pg_loss, nash_md_step, orient_pairs, rebel_loss,
                                                   rpo_demos_loss, spac_loss, spin_loss)
from distalign.testbed.tabular import kl

D = torch.float64


def logsig(z):
    return -math.log1p(math.exp(-z))


def test_orient_pairs():
    chosen, rejected = orient_pairs(torch.tensor([1., 2.]), torch.tensor([3., 4.]), torch.tensor([True, False]))
    assert chosen.tolist() == [1., 4.] and rejected.tolist() == [3., 2.]


def test_rebel_matches_hand_formula_and_gradcheck():
    # a: log pi -3, pi_t -3.5; b: log pi -4, pi_t -3.8; R(a)=1, R(b)=0.2, eta=0.5
    # gap = 0.5 - (-0.2) = 0.7; target 0.4; loss = 0.09
    args = [torch.tensor([v], dtype=D) for v in (-3.0, -4.0, -3.5, -3.8, 1.0, 0.2)]
    assert rebel_loss(*args, eta=0.5).item() == pytest.approx(0.09, abs=1e-12)
    policy = torch.randn(4, 2, dtype=D, requires_grad=True)
    fixed = torch.randn(4, 4, dtype=D)
    assert torch.autograd.gradcheck(lambda p: rebel_loss(p[:, 0], p[:, 1], *fixed.unbind(1), eta=0.7), (policy,))


def test_rebel_rewards_and_old_logps_get_no_gradient():
    old = torch.zeros(3, dtype=D, requires_grad=True)
    reward = torch.ones(3, dtype=D, requires_grad=True)
    policy = torch.ones(3, dtype=D, requires_grad=True)
    rebel_loss(policy, torch.zeros(3, dtype=D), old, old, reward, 0 * reward).sum().backward()
    assert old.grad is None and reward.grad is None and policy.grad is not None


def test_spin_is_dpo_against_previous_iterate():
    # beta (0.5 - (-1.0)) * 0.1 = 0.15
    value = spin_loss(*[torch.tensor([v], dtype=D) for v in (-2.0, -5.0, -2.5, -4.0)], beta=0.1)
    assert value.item() == pytest.approx(-logsig(0.15), abs=1e-12)


def test_spac_and_rpo_demos_match_formulas():
    demo = [torch.tensor(v, dtype=D) for v in ([-2.0, -3.0], [-4.0, -3.5], [-2.5, -3.0], [-3.0, -3.0])]
    pairs = [torch.tensor(v, dtype=D) for v in ([-1.0], [-2.0], [-1.5], [-1.5])]
    beta, alpha = 0.5, 0.3
    margins_demo = [0.5 + 1.0, 0.0 + 0.5]          # (s+ - r+) - (s- - r-)
    expected = (sum(-logsig(beta * m) for m in margins_demo) / 2) + alpha * -logsig(beta * 1.0)
    assert spac_loss(*demo, *pairs, beta=beta, alpha=alpha).item() == pytest.approx(expected, abs=1e-12)
    lengths = torch.tensor([2.0, 4.0], dtype=D)
    expected_rpo = (2.0 / 2 + 3.0 / 4) / 2 + alpha * -logsig(beta * 1.0)
    assert rpo_demos_loss(demo[0], lengths, *pairs, beta=beta, alpha=alpha).item() == pytest.approx(expected_rpo)


def test_aihf_reward_loss_reduces_to_irl():
    rd, rs = torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0.0, 0.5], dtype=D)
    rc, rr = torch.tensor([2.0], dtype=D), torch.tensor([1.0], dtype=D)
    irl = (-logsig(1.0) - logsig(-0.5)) / 2
    assert aihf_reward_loss(rd, rs).item() == pytest.approx(irl)
    assert aihf_reward_loss(rd, rs, rc, rr, demo_weight=2.0, alpha=0.5).item() == pytest.approx(
        2 * irl + 0.5 * -logsig(1.0))


def loop_nash_step(policy, ref, pref, eta, tau):
    """Munos et al. Eq. 10 written element by element in Python floats."""
    k = len(policy)
    mix = [math.exp((1 - eta * tau) * policy[i] + eta * tau * ref[i]) for i in range(k)]
    mix = [m / sum(mix) for m in mix]
    new = [mix[i] * math.exp(eta * sum(mix[j] * pref[i][j] for j in range(k))) for i in range(k)]
    return [math.log(v / sum(new)) for v in new]


def test_nash_md_step_matches_loop_and_minimises_its_objective():
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(4, 4, generator=gen, dtype=D)
    pref = raw / (raw + raw.T)                       # P(i > j) + P(j > i) = 1
    policy = torch.log_softmax(torch.randn(4, generator=gen, dtype=D), -1)
    ref = torch.log_softmax(torch.randn(4, generator=gen, dtype=D), -1)
    step = nash_md_step(policy, ref, pref, eta=0.8, tau=0.3)
    assert step.tolist() == pytest.approx(loop_nash_step(policy.tolist(), ref.tolist(), pref.tolist(), 0.8, 0.3))
    logits = step.clone().requires_grad_(True)
    mix = geometric_mixture(policy, ref, 0.8 * 0.3)
    (grad,) = torch.autograd.grad(nash_md_objective(torch.log_softmax(logits, -1), mix, pref, 0.8), logits)
    assert grad.abs().max() < 1e-12
    other = torch.log_softmax(step + 0.1 * torch.randn(4, generator=gen, dtype=D), -1)
    assert nash_md_objective(other, mix, pref, 0.8) > nash_md_objective(step, mix, pref, 0.8)


def test_score_function_kl_gradient_is_unbiased_and_k1_autograd_is_not():
    """PMLE's beta*KL term: mean over R replicate batches of the surrogate's gradient vs the exact
    gradient of KL(pi||pi0) in the logits; within 4 standard errors, while autograd through k1 is off."""
    gen = torch.Generator().manual_seed(1)
    k, group, reps = 5, 4, 4000
    logits0 = torch.randn(k, generator=gen, dtype=D)
    ref = torch.log_softmax(torch.randn(k, generator=gen, dtype=D), -1)
    exact_logits = logits0.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(kl(torch.log_softmax(exact_logits, -1)[None], ref[None]), exact_logits)

    logits = logits0.expand(reps, k).clone().requires_grad_(True)        # one replicate per row
    logps = torch.log_softmax(logits, -1)
    samples = torch.multinomial(logps.detach().exp(), group, replacement=True, generator=gen)  # (R, group)
    policy_logps = logps.gather(1, samples).reshape(-1)
    ref_logps = ref[samples].reshape(-1)
    surrogate = score_function_kl(policy_logps, ref_logps, group).sum() / group
    (grads,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(reps)
    assert ((mean - exact).abs() < 4 * stderr + 1e-12).all(), (mean, exact, stderr)
    (wrong,) = torch.autograd.grad(kl_estimate(policy_logps, ref_logps).sum() / group, logits)
    assert ((wrong.mean(0) - exact).abs() > 10 * stderr).any()


def test_nash_md_pg_loss_matches_hand_formula_and_its_gradient():
    """-(p - 1/2) s + tau (l - b) s per sample, l = s - r, b = the other sample of the prompt (groups of 2);
    d/ds = -(p - 1/2) + tau (l - b): the preference and the KL advantage are labels, not differentiated."""
    s = [-3.0, -4.5, -2.0, -6.0]
    r = [-3.5, -4.0, -3.0, -5.0]
    p = [0.9, 0.2, 0.5, 0.7]
    tau = 0.3
    l = [si - ri for si, ri in zip(s, r)]
    b = [l[1], l[0], l[3], l[2]]
    expected = [-(pi - 0.5) * si + tau * (li - bi) * si for si, pi, li, bi in zip(s, p, l, b)]
    expected_grad = [-(pi - 0.5) + tau * (li - bi) for pi, li, bi in zip(p, l, b)]
    policy = torch.tensor(s, dtype=D, requires_grad=True)
    ref, pref = torch.tensor(r, dtype=D, requires_grad=True), torch.tensor(p, dtype=D, requires_grad=True)
    loss = nash_md_pg_loss(policy, ref, pref, tau=tau, group_size=2)
    assert loss.tolist() == pytest.approx(expected, abs=1e-12)
    loss.sum().backward()
    assert policy.grad.tolist() == pytest.approx(expected_grad, abs=1e-12)
    assert ref.grad is None and pref.grad is None
    no_kl = nash_md_pg_loss(torch.tensor(s, dtype=D), None, torch.tensor(p, dtype=D))
    assert no_kl.tolist() == pytest.approx([-(pi - 0.5) * si for si, pi in zip(s, p)], abs=1e-12)


def test_nash_md_pg_gradient_is_unbiased_for_the_regularised_game():
    """Mean over R replicate batches of the Nash-MD-PG gradient (y ~ pi, y' ~ pi_mix, P from a
    non-transitive table) vs the exact gradient of -[P(pi > pi_mix) - tau KL(pi||pi_ref)] in the logits,
    pi_mix fixed: within 4 standard errors. Dropping the KL term moves the mean by many standard errors."""
    gen = torch.Generator().manual_seed(2)
    k, group, reps, tau = 5, 4, 4000, 0.5
    raw = torch.rand(k, k, generator=gen, dtype=D)
    pref = raw / (raw + raw.T)                                           # P(i > j) + P(j > i) = 1
    logits0 = torch.randn(k, generator=gen, dtype=D)
    ref = torch.log_softmax(torch.randn(k, generator=gen, dtype=D), -1)
    mix = geometric_mixture(torch.log_softmax(logits0, -1), ref, 0.25)
    exact_logits = logits0.clone().requires_grad_(True)
    policy = torch.log_softmax(exact_logits, -1)
    game = policy.exp() @ pref @ mix.exp() - tau * kl(policy[None], ref[None])
    (exact,) = torch.autograd.grad(-game, exact_logits)

    logits = logits0.expand(reps, k).clone().requires_grad_(True)
    logps = torch.log_softmax(logits, -1)
    y = torch.multinomial(logps.detach().exp(), group, replacement=True, generator=gen)      # (R, group)
    y_opp = torch.multinomial(mix.exp().expand(reps, k), group, replacement=True, generator=gen)
    args = logps.gather(1, y).reshape(-1), ref[y].reshape(-1), pref[y, y_opp].reshape(-1)
    surrogate = nash_md_pg_loss(*args, tau=tau, group_size=group).sum() / group
    (grads,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(reps)
    assert ((mean - exact).abs() < 4 * stderr + 1e-12).all(), (mean, exact, stderr)
    (no_kl,) = torch.autograd.grad(nash_md_pg_loss(*args, tau=0.0, group_size=group).sum() / group, logits)
    assert ((no_kl.mean(0) - exact).abs() > 10 * stderr).any()
