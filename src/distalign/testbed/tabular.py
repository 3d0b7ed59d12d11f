"""Tabular ground truth: X contexts x K responses, softmax policies, exact metrics (SPEC §5, level 1).

A `TabularProblem` holds the target log-probs log pi*(a|x), the reference log-probs log pi0(a|x)
and a reward table r(x,a), all (X, K). Preference data follow seed 001 Eq. 3:
x ~ uniform, a, b ~ mu(x) i.i.d., label a > b with probability sigma(gamma (log pi*(a|x) - log pi*(b|x))).

Datasets are kept as win counts W[s, x, a, b] = number of sampled pairs with chosen a and rejected b
in seed s, shape (S, X, K, K), so an empirical loss costs the same for n = 250 and n = 16000.
The population ("n = infinity") version of the same tensor is `expected_wins`: the pair
probabilities mu(x, a, b) P(a > b | x), which sum to 1 per context set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float64


@dataclass
class TabularProblem:
    """Target, reference and reward tables over X contexts and K responses; all (X, K)."""
    target_logps: Tensor
    ref_logps: Tensor
    reward: Tensor
    gamma: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.target_logps.shape)


def make_problem(n_contexts: int = 4, n_responses: int = 8, sigma: float = 1.5, gamma: float = 1.0,
                 seed: int = 0, ref_sigma: float = 0.0, target_logits: Tensor | None = None) -> TabularProblem:
    """pi* = softmax(logits), logits ~ N(0, sigma^2) (or `target_logits`); pi0 = softmax(N(0, ref_sigma^2)),
    uniform when ref_sigma = 0; r(x, a) ~ N(0, 1), an independent reward for the reward-BT switch."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n_contexts, n_responses)
    if target_logits is None:
        target_logits = sigma * torch.randn(shape, generator=gen, dtype=DTYPE)
    elif tuple(target_logits.shape) != shape:
        raise ValueError(f"target_logits: expected shape {shape}, got {tuple(target_logits.shape)}")
    ref_logits = ref_sigma * torch.randn(shape, generator=gen, dtype=DTYPE)
    reward = torch.randn(shape, generator=gen, dtype=DTYPE)
    return TabularProblem(torch.log_softmax(target_logits.to(DTYPE), -1), torch.log_softmax(ref_logits, -1),
                          reward, gamma)


def bt_pref_prob(logps: Tensor, gamma: float | Tensor = 1.0) -> Tensor:
    """P(a > b | x) = sigma(gamma (l(a|x) - l(b|x))) (seed 001 Eq. 3). (X, K) -> (X, K, K).
    `gamma` may be a per-context tensor of shape (X,)."""
    gamma = torch.as_tensor(gamma, dtype=logps.dtype)
    if gamma.dim() == 1:
        gamma = gamma[:, None, None]
    return torch.sigmoid(gamma * (logps[..., :, None] - logps[..., None, :]))


def uniform_mu(n_contexts: int, n_responses: int) -> Tensor:
    return torch.full((n_contexts, n_responses), 1.0 / n_responses, dtype=DTYPE)


def restricted_mu(n_contexts: int, n_responses: int, covered: int) -> Tensor:
    """Uniform over the first `covered` responses of every context; the rest are never sampled."""
    if not 1 <= covered <= n_responses:
        raise ValueError(f"covered must be in [1, {n_responses}], got {covered}")
    mu = torch.zeros((n_contexts, n_responses), dtype=DTYPE)
    mu[:, :covered] = 1.0 / covered
    return mu


def pair_probs(mu: Tensor) -> Tensor:
    """Probability of drawing (x, a, b): (1/X) mu(a|x) mu(b|x). (X, K) -> (X, K, K), sums to 1."""
    return mu[:, :, None] * mu[:, None, :] / mu.shape[0]


def expected_wins(mu: Tensor, pref_prob: Tensor) -> Tensor:
    """Population win tensor, E[W] / n: W[x, a, b] = (P(draw (x,a,b)) + P(draw (x,b,a))) P(a > b | x),
    since a is the chosen response whenever {a, b} is drawn in either order and a wins. (X, K, K); sums to 1."""
    cells = pair_probs(mu)
    return cells * pref_prob + cells.transpose(-1, -2) * pref_prob


def sample_wins(mu: Tensor, pref_prob: Tensor, n: int, n_seeds: int, generator: torch.Generator) -> Tensor:
    """n labelled pairs per seed as win counts W[s, x, a, b] (chosen a, rejected b); (S, X, K, K).

    The draw is exact: pair cells (x, a, b) ~ Multinomial(n, pair_probs), then for each cell
    Binomial(count, P(a > b | x)) of its pairs have a as the chosen response.
    """
    cells = pair_probs(mu).reshape(-1)
    counts = torch.stack([torch.multinomial(cells, n, replacement=True, generator=generator)
                          .bincount(minlength=cells.numel()) for _ in range(n_seeds)]).to(DTYPE)
    counts = counts.view(n_seeds, *pref_prob.shape)
    a_wins = torch.binomial(counts, pref_prob.expand_as(counts).contiguous(), generator=generator)
    return a_wins + (counts - a_wins).transpose(-1, -2)


# ---------------------------------------------------------------------------------------------------
# Exact metrics. Inputs are log-prob tables (..., X, K); contexts are averaged (x uniform).

def kl(p_logps: Tensor, q_logps: Tensor) -> Tensor:
    """E_x KL(p(x) || q(x)) = E_x sum_a p(a|x) (log p - log q), with 0 log 0 = 0. Returns (...,)."""
    p = p_logps.exp()
    terms = torch.where(p > 0, p * (p_logps - q_logps), torch.zeros_like(p))
    return terms.sum(-1).mean(-1)


def preference_accuracy(target_logps: Tensor, policy_logps: Tensor) -> Tensor:
    """Share of response pairs a != b (uniform over x and pairs) that the policy orders as pi* does."""
    target_gap = target_logps[..., :, None] - target_logps[..., None, :]
    policy_gap = policy_logps[..., :, None] - policy_logps[..., None, :]
    off_diag = ~torch.eye(target_logps.shape[-1], dtype=torch.bool)
    agree = ((target_gap * policy_gap) > 0) & off_diag
    return agree.to(DTYPE).sum((-1, -2)).mean(-1) / off_diag.sum()


def metrics(problem: TabularProblem, policy_logps: Tensor) -> dict[str, Tensor]:
    """Exact KL(pi*||pi), KL(pi||pi*), KL(pi||pi0) and preference accuracy; each (...,)."""
    return {"kl_target_policy": kl(problem.target_logps, policy_logps),
            "kl_policy_target": kl(policy_logps, problem.target_logps),
            "kl_policy_ref": kl(policy_logps, problem.ref_logps),
            "pref_accuracy": preference_accuracy(problem.target_logps, policy_logps)}
