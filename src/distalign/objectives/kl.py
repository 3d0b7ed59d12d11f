"""KL(pi || pi0) on samples of pi: value estimators and a score-function gradient surrogate.

Sequence-level: `policy_logps` = log pi(y|x), `ref_logps` = log pi0(y|x) for y ~ pi(.|x).
"""
from __future__ import annotations

import torch
from torch import Tensor


def kl_estimate(policy_logps: Tensor, ref_logps: Tensor, kind: str = "k1") -> Tensor:
    """Per-sample estimates of KL(pi||pi0) from samples of pi (Schulman 2020, "Approximating KL").

    With l = log pi - log pi0: k1 = l (unbiased, high variance, can be negative);
    k2 = l^2 / 2 (biased, low variance); k3 = exp(-l) - 1 + l (unbiased, always >= 0; GRPO's choice).
    These are *values*. Their autograd gradient is not the KL gradient; use `score_function_kl`.
    """
    log_ratio = policy_logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def sequence_kl_estimate(token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor, kind: str = "k3") -> Tensor:
    """Per-response estimate of KL(pi(.|x) || pi0(.|x)) from y ~ pi: sum over response tokens of the
    per-token `kl_estimate` of `kind`. (B, T) tensors, mask 1 on response tokens; returns (B,).

    k3 (the default, what the trainers log as `kl`): each token's exp(-l_t) - 1 + l_t is >= 0 with
    conditional mean KL(pi(.|x,y<t) || pi0(.|x,y<t)), so by the chain rule the sum is an unbiased,
    never-negative estimate of the sequence KL. k1 sums l_t = log pi - log pi0: the same mean, but a
    single response's value (and a small batch's mean) can be negative; the trainers log it as `kl_k1`.
    """
    return (kl_estimate(token_logps, ref_token_logps, kind) * mask).sum(-1)


def leave_one_out_baseline(values: Tensor, group_size: int) -> Tensor:
    """b_i = mean of the other k-1 values in i's group of k consecutive samples (RLOO). (B,) -> (B,)."""
    if group_size < 2:
        return torch.zeros_like(values)
    groups = values.view(-1, group_size)
    return ((groups.sum(-1, keepdim=True) - groups) / (group_size - 1)).view(-1)


def score_function_kl(policy_logps: Tensor, ref_logps: Tensor, group_size: int = 1) -> Tensor:
    """Surrogate whose gradient is an unbiased estimate of grad KL(pi||pi0) (seed 001 Eq. 5's KL term).

    grad KL = E_pi[(log pi(y) - log pi0(y)) grad log pi(y)], because E_pi[grad log pi] = 0. The
    surrogate is (l - b).detach() * log pi(y), with b the leave-one-out mean of l over each group of
    `group_size` samples of the same prompt (no bias: b_i does not depend on y_i). Autograd through a
    sampled k1 value instead gives E[grad log pi - grad log pi0] = -E[grad log pi0]: wrong.
    Its value is not the KL; log `kl_estimate` for that. Shapes (B,); returns (B,).
    """
    log_ratio = (policy_logps - ref_logps).detach()
    advantage = log_ratio - leave_one_out_baseline(log_ratio, group_size)
    return advantage * policy_logps
