"""Policy-gradient objectives against independent float64 formulas written with Python loops."""
import math
import threading

import pytest
import torch

from distalign.objectives import reverse_kl_loss, reverse_kl_optimum
from distalign.objectives.online_registry import ONLINE_OBJECTIVES, RolloutTensors, get_online_objective
from distalign.objectives.policy_gradient import (
    aggregate_token_losses,
    clipped_surrogate_loss,
    clipped_value_loss,
    gae,
    grpo_advantages,
    k3_token_kl,
    kl_penalized_token_rewards,
    masked_whiten,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl_penalized_scores,
)

D = torch.float64
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=D)
LENGTHS = [4, 2, 3]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_masked_whiten_matches_unbiased_statistics():
    x = rand(3, 4)
    vals = [x[i, t].item() for i in range(3) for t in range(LENGTHS[i])]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    out = masked_whiten(x, MASK, eps=0.0)
    for i in range(3):
        for t in range(4):
            want = (x[i, t].item() - mean) / std if t < LENGTHS[i] else 0.0
            assert out[i, t].item() == pytest.approx(want, abs=1e-12)


def test_aggregate_token_losses_modes():
    x = rand(3, 4, seed=1)
    sums = [sum(x[i, t].item() for t in range(LENGTHS[i])) for i in range(3)]
    seq = aggregate_token_losses(x, MASK, "sequence")
    tok = aggregate_token_losses(x, MASK, "token")
    const = aggregate_token_losses(x, MASK, "constant", max_length=10)
    for i in range(3):
        assert seq[i].item() == pytest.approx(sums[i] / LENGTHS[i])
        assert const[i].item() == pytest.approx(sums[i] / 10)
    assert tok.mean().item() == pytest.approx(sum(sums) / sum(LENGTHS))  # DAPO: mean over all tokens
    with pytest.raises(ValueError, match="length_norm"):
        aggregate_token_losses(x, MASK, "mean")


def test_clipped_surrogate_against_loop_and_clip_fraction():
    logp, old, adv = rand(3, 4, seed=2) * 0.3, rand(3, 4, seed=3) * 0.3, rand(3, 4, seed=4)
    loss, clipped = clipped_surrogate_loss(logp, old, adv, MASK, clip_eps=0.1, clip_eps_high=0.25)
    for i in range(3):
        total, n_clipped = 0.0, 0
        for t in range(LENGTHS[i]):
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            surrogate = min(ratio * a, min(max(ratio, 0.9), 1.25) * a)
            total += -surrogate
            n_clipped += surrogate < ratio * a
        assert loss[i].item() == pytest.approx(total / LENGTHS[i], abs=1e-12)
        assert clipped[i].sum().item() == n_clipped
    assert clipped.sum() > 0  # the example exercises clipping


def test_clipped_surrogate_gradient_is_reinforce_at_ratio_one():
    logp = rand(3, 4, seed=5).requires_grad_()
    adv = rand(3, 4, seed=6)
    loss, _ = clipped_surrogate_loss(logp, logp.detach(), adv, MASK, length_norm="constant", max_length=1)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv * MASK)
    x = (rand(2, 3, seed=7) * 0.05).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: clipped_surrogate_loss(z, torch.zeros(2, 3, dtype=D), rand(2, 3, seed=8), torch.ones(2, 3, dtype=D))[0],
        (x,))


def test_clipped_value_loss_against_loop():
    v, old, ret = rand(3, 4, seed=9), rand(3, 4, seed=10), rand(3, 4, seed=11)
    out = clipped_value_loss(v, old, ret, MASK, clip_range=0.2)
    for i in range(3):
        terms = []
        for t in range(LENGTHS[i]):
            vc = old[i, t].item() + min(max(v[i, t].item() - old[i, t].item(), -0.2), 0.2)
            terms.append(0.5 * max((v[i, t].item() - ret[i, t].item()) ** 2, (vc - ret[i, t].item()) ** 2))
        assert out[i].item() == pytest.approx(sum(terms) / len(terms))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_against_discounted_sums(gamma, lam):
    r, v = rand(3, 4, seed=12), rand(3, 4, seed=13)
    adv, ret = gae(r, v, MASK, gamma, lam)
    for i in range(3):
        n = LENGTHS[i]
        vals = [v[i, t].item() for t in range(n)] + [0.0]
        deltas = [r[i, t].item() + gamma * vals[t + 1] - vals[t] for t in range(n)]
        for t in range(4):
            want = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) if t < n else 0.0
            assert adv[i, t].item() == pytest.approx(want, abs=1e-12)
            assert ret[i, t].item() == pytest.approx(want + vals[t] if t < n else 0.0, abs=1e-12)
    if gamma == 1.0 and lam == 1.0:  # Monte-Carlo return: reward-to-go
        assert ret[0, 0].item() == pytest.approx(r[0].sum().item())


def test_kl_penalised_rewards_put_score_on_last_token():
    logp, ref = rand(3, 4, seed=14), rand(3, 4, seed=15)
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    out = kl_penalized_token_rewards(scores, logp, ref, MASK, kl_coef=0.05)
    for i in range(3):
        for t in range(4):
            want = -0.05 * (logp[i, t] - ref[i, t]).item() if t < LENGTHS[i] else 0.0
            want += scores[i].item() if t == LENGTHS[i] - 1 else 0.0
            assert out[i, t].item() == pytest.approx(want)
    seq = sequence_kl_penalized_scores(scores, logp, ref, MASK, 0.05)
    assert torch.allclose(seq, out.sum(-1))  # the per-token shaping sums to the sequence return


def test_k3_is_nonnegative_and_matches_formula():
    logp, ref = rand(50, seed=16), rand(50, seed=17)
    out = k3_token_kl(logp, ref)
    want = [math.exp(b - a) - (b - a) - 1 for a, b in zip(logp.tolist(), ref.tolist())]
    assert out.tolist() == pytest.approx(want)
    assert (out >= 0).all() and k3_token_kl(logp, logp).abs().max() == 0


def test_baseline_advantages():
    scores = torch.tensor([1.0, 2.0, 4.0, 0.0, 3.0, 3.0], dtype=D)
    assert rloo_advantages(scores, 3).tolist() == pytest.approx([1 - 3, 2 - 2.5, 4 - 1.5, 0 - 3, 3 - 1.5, 3 - 1.5])
    assert reinforce_advantages(scores).tolist() == pytest.approx((scores - 13 / 6).tolist())
    g = grpo_advantages(scores, 3, eps=0.0)
    std0 = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert g[:3].tolist() == pytest.approx([(s - 7 / 3) / std0 for s in (1, 2, 4)])
    assert grpo_advantages(scores, 3, scale_rewards=False)[3:].tolist() == pytest.approx([-2, 1, 1])


def test_reverse_kl_surrogate_gradient_equals_reverse_kl_loss():
    """One update on a fresh rollout: the registry's surrogate has the gradient of `reverse_kl_loss`."""
    token_logps = (rand(6, 4, seed=18) - 2).requires_grad_()
    mask = torch.ones(6, 4, dtype=D)
    ref, scores = rand(6, 4, seed=19) - 2, rand(6, seed=20)
    obj = get_online_objective("reverse_kl")
    hp = {"kl_coef": 0.1, "entropy_coef": 0.3}
    r = obj.prepare(RolloutTensors(scores, token_logps.detach(), mask, ref, group_size=3), hp)
    loss, _ = obj.loss(token_logps, None, r, max_length=1)
    (g_ours,) = torch.autograd.grad(loss.sum(), token_logps)
    want = reverse_kl_loss(token_logps.sum(-1), ref.sum(-1), scores, beta=0.1, gamma=0.3, group_size=3)
    (g_want,) = torch.autograd.grad(want.sum(), token_logps)
    assert torch.allclose(g_ours, g_want)


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.0), (0.2, 0.3)])
def test_reverse_kl_tabular_reaches_closed_form_optimum(beta, gamma):
    """Single step, K responses, exact expectation: sum_k pi_k * per-sample loss_k (weights detached)."""
    K = 6
    p0 = torch.softmax(0.5 * rand(K, seed=21), -1)
    reward = 0.5 * rand(K, seed=22)  # optimum away from the simplex boundary, so it is reached fast
    logits = torch.zeros(K, dtype=D, requires_grad=True)
    obj = ONLINE_OBJECTIVES["reverse_kl"]
    optimizer = torch.optim.Adam([logits], lr=0.05)  # scale-free: small-probability logits move too
    ones = torch.ones(K, 1, dtype=D)
    for _ in range(1500):
        logp = torch.log_softmax(logits, -1)[:, None]  # sample k = response k, one token
        r = obj.prepare(RolloutTensors(reward, logp.detach(), ones, torch.log(p0)[:, None]),
                        {"kl_coef": beta, "entropy_coef": gamma})
        loss, _ = obj.loss(logp, None, r, max_length=1)
        optimizer.zero_grad()
        (torch.softmax(logits, -1).detach() * loss).sum().backward()
        optimizer.step()
    target = reverse_kl_optimum(p0, reward, beta, gamma)
    assert torch.allclose(torch.softmax(logits, -1), target, atol=1e-6)


def test_registry_entries_and_errors():
    assert set(ONLINE_OBJECTIVES) == {"ppo", "reinforce", "rloo", "grpo", "reverse_kl"}
    assert ONLINE_OBJECTIVES["ppo"].needs_value_head and ONLINE_OBJECTIVES["grpo"].kl_in_loss
    assert ONLINE_OBJECTIVES["ppo"].hyperparameters() == {"kl_coef": 0.05, "gamma": 1.0, "lam": 0.95,
                                                          "whiten_advantages": True}
    assert not ONLINE_OBJECTIVES["grpo"].needs_reference({"kl_coef": 0.0})
    with pytest.raises(ValueError, match="unknown online method 'dpo'"):
        get_online_objective("dpo")


def as_processes(fn, shards):
    """fn(shard, sum_processes) for every shard, each in its own thread, as on that many processes:
    `sum_processes` is a collective, blocking until every shard has contributed, then returning the sum."""
    barrier, slots, results = threading.Barrier(len(shards)), [None] * len(shards), [None] * len(shards)

    def run(i):
        def sum_processes(tensor):
            slots[i] = tensor
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        results[i] = fn(shards[i], sum_processes)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batch_statistics_with_sum_processes_equal_one_process_with_every_row():
    x, mask = rand(6, 4, seed=7), torch.cat([MASK, MASK.flip(0)])
    shards = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    whitened = as_processes(lambda s, sum_processes: masked_whiten(*s, sum_processes=sum_processes), shards)
    torch.testing.assert_close(torch.cat(whitened), masked_whiten(x, mask), rtol=0, atol=1e-12)
    assert not torch.allclose(torch.cat([masked_whiten(*s) for s in shards]), masked_whiten(x, mask))
    returns = x[:, 0]
    centred = as_processes(lambda r, sum_processes: reinforce_advantages(r, sum_processes),
                           [returns[:2], returns[2:]])  # unequal shares: the mean weighs rows, not processes
    torch.testing.assert_close(torch.cat(centred), reinforce_advantages(returns), rtol=0, atol=1e-12)


def test_token_mean_with_a_global_mean_length_weighs_every_token_alike():
    x, mask = rand(6, 4, seed=8), torch.cat([MASK, MASK.flip(0)])
    mean_length = mask.sum() / len(mask)  # of all rows, as the loop passes it
    halves = [aggregate_token_losses(x[s], mask[s], "token", mean_length=mean_length).mean()
              for s in (slice(0, 3), slice(3, 6))]
    # Averaging the halves' losses (DDP averages their gradients) gives the mean over all tokens.
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(((x * mask).sum() / mask.sum()).item())
    torch.testing.assert_close(aggregate_token_losses(x, mask, "token", mean_length=mean_length),
                               aggregate_token_losses(x, mask, "token"))
