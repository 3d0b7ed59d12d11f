"""Exact full-batch fits of tabular softmax policies with the library's objective functions.

Every estimator takes win counts W (S, X, K, K) from `tabular.sample_wins` (or the population
tensor `tabular.expected_wins`, broadcast to (S, ...)) and returns log-prob tables (S, X, K). The
empirical loss is the W-weighted mean of the per-pair loss, e.g. for PMLE (seed 001 Eq. 4)

    L(pi) = sum_{x,a,b} W[x,a,b] pmle_loss(log pi(a|x), log pi(b|x)) / sum W,

which equals the mean over the n sampled pairs. Seeds are independent, so the sum of their losses
is minimised in one damped-Newton run (float64, exact block Hessians) over all seeds at once.

`prior` is a Gaussian prior of fixed total strength on the centred logits (the loss gets
(prior / n) * mean_x sum_a (l(a|x) - mean_a l(a|x))^2). At small n a response may never lose (or never
win) in some context, and the unpenalised MLE is then at infinity; the prior keeps it finite. Its
bias is O(1/n) in the logits, hence O(1/n^2) in KL, below the O(1/n) estimation error studied here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from distalign.objectives import distill_loss, dpo_loss, pmle_loss, reverse_kl_shaped_reward, reward_bt_loss

from .tabular import DTYPE

DEFAULT_PRIOR = 1.0


def minimise(block_objective: Callable[[Tensor], Tensor], init: Tensor, max_iter: int = 100,
             grad_tol: float = 1e-10, max_step: float = 2.0) -> Tensor:
    """Damped saddle-free Newton on independent blocks: params (..., X, K), block_objective -> (..., X) losses.

    Seeds and contexts separate, so the Hessian is block diagonal with K x K blocks; K Hessian-vector
    products give every block at once. All objectives here are invariant to a per-block shift of
    the parameters (softmax logits, Bradley-Terry rewards): we add 11^T / K to each block, which makes
    it invertible without changing the step (the gradient is orthogonal to 1); negative eigenvalues
    are replaced by their magnitudes (saddle-free Newton) so every step points downhill. A step is kept where
    it lowers that block's loss; otherwise the block's Levenberg damping grows tenfold. Each block's
    step is capped at `max_step` in every coordinate.
    """
    params = init.detach().clone().to(DTYPE)
    n_resp = params.shape[-1]
    damping = torch.full(params.shape[:-1], 1e-8, dtype=DTYPE)
    for _ in range(max_iter):
        leaf = params.clone().requires_grad_(True)
        loss = block_objective(leaf)
        (grad,) = torch.autograd.grad(loss.sum(), leaf, create_graph=True)
        if grad.abs().max() < grad_tol:
            break
        # row k of every block at once: the gradient's k-th coordinate, differentiated in one batch
        basis = torch.eye(n_resp, dtype=DTYPE)[:, None, None, :].expand(n_resp, *grad.shape)
        rows = torch.autograd.grad(grad, leaf, grad_outputs=basis, is_grads_batched=True)[0]
        hessian = rows.movedim(0, -2).detach() + 1.0 / n_resp
        # saddle-free Newton: |eigenvalues| keep the step a descent direction where a block is
        # not convex (the reverse-KL objective in logits, far from its optimum)
        eigvals, eigvecs = torch.linalg.eigh(hessian)
        coeffs = (eigvecs.transpose(-1, -2) @ grad.detach().unsqueeze(-1)).squeeze(-1)
        coeffs = coeffs / (eigvals.abs() + damping[..., None])
        step = (eigvecs @ coeffs.unsqueeze(-1)).squeeze(-1)
        # a trust region: far from the optimum an indefinite block can propose a huge step that
        # saturates the softmax, where gradients vanish and progress stalls
        step = step * (max_step / step.abs().amax(-1, keepdim=True).clamp_min(max_step))
        candidate = params - step
        with torch.no_grad():
            new_loss = block_objective(candidate)
        better = new_loss <= loss.detach() + 1e-14 * loss.detach().abs()
        params = torch.where(better[..., None], candidate, params)
        damping = torch.where(better, (damping / 10).clamp_min(1e-12), damping * 10)
    return params


@dataclass
class Fit:
    """One estimator's problem: `objective` maps a table (S, X, K) to per-context losses (S, X).
    kind "policy": the table is log_softmax(theta); kind "reward": the table is theta centred per context."""
    objective: Callable[[Tensor], Tensor]
    init: Tensor
    kind: str = "policy"

    def table(self, theta: Tensor) -> Tensor:
        if self.kind == "policy":
            return torch.log_softmax(theta, -1)
        return theta - theta.mean(-1, keepdim=True)


def solve(fits: list[Fit], max_iter: int = 100) -> list[Tensor]:
    """Minimise several independent estimators in one Newton run (stacked along the seed axis, since
    per-iteration cost is mostly fixed overhead); returns each fitted table (log-probs or rewards)."""
    sizes = [fit.init.shape[0] for fit in fits]

    def joint(theta):
        return torch.cat([fit.objective(fit.table(part)) for fit, part in zip(fits, theta.split(sizes))])
    init = torch.cat([fit.init.to(DTYPE) for fit in fits])
    with single_thread():
        theta = minimise(joint, init, max_iter)
    return [fit.table(part) for fit, part in zip(fits, theta.split(sizes))]


@contextmanager
def single_thread():
    """These tensors are tiny: with several threads, synchronisation costs more than the arithmetic
    (20x slower on a loaded 2-core machine), so the fits run single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pair_tables(table: Tensor) -> tuple[Tensor, Tensor]:
    """(..., X, K) -> the chosen-side and rejected-side views (..., X, K, K): [a, b] holds t(a), t(b)."""
    size = table.shape + table.shape[-1:]
    return table[..., :, None].expand(size), table[..., None, :].expand(size)


def weighted_mean(wins: Tensor, per_pair: Tensor) -> Tensor:
    """Each context's share of the mean per-pair loss over a seed's labelled pairs: (S, X, K, K) -> (S, X).
    Summed over contexts it is the seed's empirical loss."""
    return (wins * per_pair).sum((-2, -1)) / wins.sum((-3, -2, -1))[..., None]


def centred_ridge(table: Tensor, strength: float) -> Tensor:
    """strength * mean_x sum_a (t(a|x) - mean_a t(a|x))^2, per context: (S, X, K) -> (S, X)."""
    centred = table - table.mean(-1, keepdim=True)
    return strength * centred.square().sum(-1) / table.shape[-2]


def prior_strength(wins: Tensor, prior: float) -> float:
    """prior / n, with n the number of pairs per seed (equal across seeds by construction)."""
    n = wins.sum((-3, -2, -1))
    if prior == 0.0:
        return 0.0
    if not torch.allclose(n, n[0]):
        raise ValueError("wins: every seed must hold the same number of pairs n when prior > 0")
    return prior / float(n[0])


def _zeros(wins: Tensor) -> Tensor:
    return torch.zeros(wins.shape[:-1], dtype=DTYPE)


def pmle_fit(wins: Tensor, gamma: float = 1.0, prior: float = DEFAULT_PRIOR) -> Fit:
    """PMLE with beta = 0 (seed 001 Eq. 4): argmin mean -log sigma(gamma (log pi(a+) - log pi(a-)))."""
    ridge = prior_strength(wins, prior)

    def objective(logps):
        chosen, rejected = pair_tables(logps)
        return weighted_mean(wins, pmle_loss(chosen, rejected, gamma)) + centred_ridge(logps, ridge)
    return Fit(objective, _zeros(wins))


def bt_reward_fit(wins: Tensor, prior: float = DEFAULT_PRIOR) -> Fit:
    """Bradley-Terry reward table R (S, X, K) (seed 001 Eq. 9) with the library's l2 term set to prior / n.
    BT fixes R only up to a per-context shift; the table is kept centred."""
    l2 = prior_strength(wins, prior)

    def objective(reward):
        chosen, rejected = pair_tables(reward)
        return weighted_mean(wins, reward_bt_loss(chosen, rejected, l2=l2))
    return Fit(objective, _zeros(wins), kind="reward")


def distill_fit(wins: Tensor, reward: Tensor, gamma: float = 1.0) -> Fit:
    """Offline preference distillation (seed 001 Eq. 11) on the dataset's pairs, soft labels from `reward`.
    The soft labels lie in (0, 1), so the minimiser is finite: gamma log pi = reward + c(x) on every
    connected comparison graph."""
    reward_chosen, reward_rejected = pair_tables(reward.expand(wins.shape[:-1]))

    def objective(logps):
        chosen, rejected = pair_tables(logps)
        return weighted_mean(wins, distill_loss(chosen, rejected, reward_chosen, reward_rejected, gamma))
    return Fit(objective, _zeros(wins))


def dpo_fit(wins: Tensor, ref_logps: Tensor, beta: float = 1.0, prior: float = DEFAULT_PRIOR) -> Fit:
    """DPO (seed 002 Eq. 18), initialised at the reference; the prior acts on the implicit reward
    log pi - log pi0. Responses that no pair mentions get no gradient: they keep their initial logits."""
    ridge = prior_strength(wins, prior)
    ref = ref_logps.expand(wins.shape[:-1])
    ref_chosen, ref_rejected = pair_tables(ref)

    def objective(logps):
        chosen, rejected = pair_tables(logps)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        return weighted_mean(wins, loss) + centred_ridge(logps - ref, ridge)
    return Fit(objective, ref.clone())


def reverse_kl_objective(logps: Tensor, reward: Tensor, ref_logps: Tensor, beta: float,
                         gamma: float) -> Tensor:
    """Exact -(E_pi[R] + gamma H(pi) - beta KL(pi||pi0)) = -E_x sum_a pi(a|x) R~(x, a) (seed 001 Eq. 16),
    R~ the library's shaped reward. Per context: (S, X, K) -> (S, X)."""
    shaped = reverse_kl_shaped_reward(reward, logps, ref_logps, beta, gamma)
    return -(logps.exp() * shaped).sum(-1) / logps.shape[-2]


def reverse_kl_fit(reward: Tensor, ref_logps: Tensor, beta: float, gamma: float) -> Fit:
    """Maximiser of Eq. 16 over tabular policies, from the reference; gamma = 0 is RLHF's E[R] - beta KL."""
    reward = reward.expand(torch.broadcast_shapes(reward.shape, ref_logps.shape))
    return Fit(lambda logps: reverse_kl_objective(logps, reward, ref_logps, beta, gamma),
               ref_logps.expand_as(reward).clone())


def fit_one(fit: Fit) -> Tensor:
    return solve([fit])[0]


def fit_online_distill(reward: Tensor, ref_logps: Tensor, gamma: float = 1.0, beta: float = 0.0,
                       rounds: int = 5) -> Tensor:
    """Online preference distillation (seed 001 Algorithm 1) in exact expectation: pairs a, b ~ pi_t
    (weights pi_t(a) pi_t(b), held fixed within a round as sampled pairs are), soft labels from
    `reward`, plus beta KL(pi||pi0); each round minimises fully and the next samples from the result."""
    reward = reward.expand(torch.broadcast_shapes(reward.shape, ref_logps.shape))
    reward_chosen, reward_rejected = pair_tables(reward)
    logps = ref_logps.expand_as(reward).clone()
    for _ in range(rounds):
        probs = logps.exp()
        wins = probs[..., :, None] * probs[..., None, :] / probs.shape[-2]

        def objective(candidate, wins=wins):
            chosen, rejected = pair_tables(candidate)
            loss = weighted_mean(wins, distill_loss(chosen, rejected, reward_chosen, reward_rejected, gamma))
            kl_to_ref = reverse_kl_objective(candidate, torch.zeros_like(reward), ref_logps, 1.0, 0.0)
            return loss + beta * kl_to_ref
        logps = solve([Fit(objective, logps)])[0]
    return logps


@dataclass
class FeatureReward:
    """A Bradley-Terry reward linear in fixed features: R(x, a) = phi(x, a) . theta, centred per context.
    rewards (S, X, K); theta (S, d); grad_max: largest |gradient| entry at the end (convergence check)."""
    rewards: Tensor
    theta: Tensor
    grad_max: float


def feature_reward_fit(wins: Tensor, features: Tensor, prior: float = 0.0, max_iter: int = 50,
                       grad_tol: float = 1e-10) -> FeatureReward:
    """Seed 001 Eq. 9 over the class {phi . theta}: features (X, K, d), usually with d << K, so the
    reward class is smaller than the tabular policy class (Assumption 5's generator-verifier gap)
    and a reward fitted on some responses extrapolates to the others through their features.

    The loss is convex in theta: Newton with step halving, float64, one joint solve for all seeds
    (the Hessian is block diagonal across seeds). `prior` adds (prior / n) |theta|^2 as in `bt_reward_fit`."""
    n_seeds, dim = wins.shape[0], features.shape[-1]
    l2 = prior_strength(wins, prior)

    def objective(theta: Tensor) -> Tensor:
        rewards = torch.einsum("xkd,sd->sxk", features.to(DTYPE), theta.view(n_seeds, dim))
        chosen, rejected = pair_tables(rewards)
        return weighted_mean(wins, reward_bt_loss(chosen, rejected)).sum() + l2 * theta.square().sum()

    theta = torch.zeros(n_seeds * dim, dtype=DTYPE)
    for _ in range(max_iter):
        loss = objective(theta)
        grad = torch.autograd.functional.jacobian(objective, theta)
        if grad.abs().max() < grad_tol:
            break
        hessian = torch.autograd.functional.hessian(objective, theta)
        step = torch.linalg.lstsq(hessian, grad[:, None]).solution[:, 0]
        scale = 1.0
        while objective(theta - scale * step) > loss and scale > 1e-8:
            scale /= 2
        theta = theta - scale * step
    grad = torch.autograd.functional.jacobian(objective, theta)
    theta = theta.view(n_seeds, dim)
    rewards = torch.einsum("xkd,sd->sxk", features.to(DTYPE), theta)
    return FeatureReward(rewards - rewards.mean(-1, keepdim=True), theta, float(grad.abs().max()))
