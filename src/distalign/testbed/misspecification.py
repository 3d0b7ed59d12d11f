"""Misspecified preference models for the tabular testbed (SPEC §5; the referee report, seed 000).

Each switch returns the label probability table P[x, a, b] = P(a is chosen over b | x), (X, K, K),
that `tabular.sample_wins` draws labels from; the learner keeps assuming seed 001 Eq. 3 with its own
gamma. At strength 0 every switch is the well-specified model sigma(gamma (log pi*(a) - log pi*(b))).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .tabular import DTYPE, TabularProblem, bt_pref_prob


def gamma_mismatch(problem: TabularProblem, labels_gamma: float) -> Tensor:
    """Labels from Eq. 3 with gamma' = labels_gamma; a learner with gamma recovers pi*^(gamma'/gamma)."""
    return bt_pref_prob(problem.target_logps, labels_gamma)


def label_noise(pref: Tensor, epsilon: float) -> Tensor:
    """Symmetric flips with probability epsilon: P' = (1 - eps) P + eps (1 - P)."""
    if not 0.0 <= epsilon <= 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5], got {epsilon}")
    return (1.0 - epsilon) * pref + epsilon * (1.0 - pref)


# Condorcet scores of responses 0, 1, 2 for three annotators ranking 0>1>2, 1>2>0 and 2>0>1.
CONDORCET_SCORES = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]], dtype=DTYPE)


def annotator_logps(problem: TabularProblem, strength: float) -> Tensor:
    """Three annotators' targets (3, X, K): log pi* plus strength x their Condorcet scores on
    responses 0, 1, 2 (renormalised). Each annotator alone is a transitive Bradley-Terry model."""
    n_contexts, n_responses = problem.shape
    if n_responses < 3:
        raise ValueError(f"the Condorcet switch needs K >= 3 responses, got {n_responses}")
    bonus = torch.zeros((3, n_contexts, n_responses), dtype=DTYPE)
    bonus[:, :, :3] = strength * CONDORCET_SCORES[:, None, :]
    return torch.log_softmax(problem.target_logps + bonus, -1)


def condorcet_annotators(problem: TabularProblem, strength: float) -> Tensor:
    """Each pair is labelled by one of three annotators drawn uniformly, so P = mean_m P_m.

    For large strength the majority relation (a beats b when P(a > b) > 1/2, i.e. most labels say
    so) has the cycle 0 > 1 > 2 > 0: each of those pairs is won by two annotators of three. (A label
    taken as the majority of three independent votes would also sharpen labels where the annotators
    agree, confounding this switch with gamma' > gamma, so the mixture is used.)
    """
    return bt_pref_prob(annotator_logps(problem, strength), problem.gamma).mean(0)


def majority_cycle(pref: Tensor) -> Tensor:
    """Per context, whether the majority relation P(a > b) > 1/2 has a 3-cycle (a > b > c > a).
    A tournament is intransitive iff it has a 3-cycle, detected as trace(M^3) > 0. (X, K, K) -> (X,)."""
    beats = (pref > 0.5).to(DTYPE)
    return torch.diagonal(beats @ beats @ beats, dim1=-2, dim2=-1).sum(-1) > 0


def reward_bt(problem: TabularProblem, strength: float) -> Tensor:
    """Labels from Bradley-Terry on a reward that mixes the model's and an unrelated table:
    R = (1 - lambda) gamma log pi* + lambda r; lambda = 1 is a purely reward-based annotator."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"reward_bt strength (lambda) must be in [0, 1], got {strength}")
    reward = (1.0 - strength) * problem.gamma * problem.target_logps + strength * problem.reward
    return bt_pref_prob(reward, 1.0)


def context_gammas(problem: TabularProblem, spread: float) -> Tensor:
    """gamma(x) = gamma exp(spread u_x), u_x evenly spaced in [-1, 1]: some contexts are labelled
    sharply, others almost at random, while the learner uses one gamma. (X,)."""
    n_contexts = problem.shape[0]
    u = torch.linspace(-1.0, 1.0, n_contexts, dtype=DTYPE) if n_contexts > 1 else torch.zeros(1, dtype=DTYPE)
    return problem.gamma * torch.exp(spread * u)


def context_gamma(problem: TabularProblem, spread: float) -> Tensor:
    return bt_pref_prob(problem.target_logps, context_gammas(problem, spread))


SWITCHES: dict[str, Callable[[TabularProblem, float], Tensor]] = {
    "gamma_mismatch": lambda p, s: gamma_mismatch(p, p.gamma * s),
    "label_noise": lambda p, s: label_noise(bt_pref_prob(p.target_logps, p.gamma), s),
    "condorcet": condorcet_annotators,
    "reward_bt": reward_bt,
    "context_gamma": context_gamma,
}
"""name -> (problem, strength) -> P. Strength: gamma'/gamma for gamma_mismatch (1 = well specified),
the flip rate for label_noise, the Condorcet score scale, lambda for reward_bt, the log-spread of gamma(x)."""

STRENGTHS: dict[str, tuple[float, ...]] = {
    "gamma_mismatch": (0.25, 0.5, 1.0, 2.0, 4.0),
    "label_noise": (0.0, 0.05, 0.1, 0.2, 0.3),
    "condorcet": (0.0, 1.0, 2.0, 4.0, 8.0),
    "reward_bt": (0.0, 0.25, 0.5, 0.75, 1.0),
    "context_gamma": (0.0, 0.5, 1.0, 1.5, 2.0),
}


def preference_table(problem: TabularProblem, switch: str, strength: float) -> Tensor:
    """The label probabilities of `switch` at `strength`; (X, K, K)."""
    if switch not in SWITCHES:
        raise ValueError(f"unknown misspecification switch {switch!r}; valid: {sorted(SWITCHES)}")
    return SWITCHES[switch](problem, strength)
