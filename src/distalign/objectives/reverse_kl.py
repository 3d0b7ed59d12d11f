"""Reverse KL with entropy (seed 001 Eq. 16): maximise E_pi[R] + gamma H(pi) - beta KL(pi || pi0).

Per sequence this is the shaped reward R~ = R - (beta+gamma) log pi + beta log pi0, whose
expectation under pi is the objective. In the single-step (tabular) case its maximiser is
p ~ p0^alpha exp(r / (beta+gamma)), alpha = beta / (beta+gamma); with gamma = 0 it is RLHF's
p0 exp(r / beta).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kl import leave_one_out_baseline


def reverse_kl_shaped_reward(rewards: Tensor, policy_logps: Tensor, ref_logps: Tensor,
                             beta: float, gamma: float = 0.0) -> Tensor:
    """R~ = R - (beta + gamma) log pi(y|x) + beta log pi0(y|x). Shapes broadcast; returns their shape.

    Applied per token (log-probs of single tokens) it is the per-token shaping of SPEC §2; summed
    over a sequence it is the sequence-level form. `sum(pi * R~)` over an enumerated support is the
    exact objective, differentiable in pi (the testbed uses that).
    """
    return rewards - (beta + gamma) * policy_logps + beta * ref_logps


def reverse_kl_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float,
                    gamma: float = 0.0, group_size: int = 1) -> Tensor:
    """Score-function surrogate for -(E[R] + gamma H - beta KL) on samples y ~ pi, one per row.

    grad E_pi[R~] = E_pi[R~ grad log pi] (the explicit grad of -(beta+gamma) log pi has zero mean),
    so the loss is -(R~ - b).detach() * log pi(y), b the leave-one-out mean of R~ within each group
    of `group_size` samples of the same prompt. Shapes (B,); returns (B,).
    """
    shaped = reverse_kl_shaped_reward(rewards, policy_logps, ref_logps, beta, gamma).detach()
    advantage = shaped - leave_one_out_baseline(shaped, group_size)
    return -advantage * policy_logps


def reverse_kl_optimum(ref_probs: Tensor, rewards: Tensor, beta: float, gamma: float = 0.0) -> Tensor:
    """Closed-form maximiser p ~ p0^alpha exp(r/(beta+gamma)) over the last axis (log-space, stable)."""
    alpha = beta / (beta + gamma)
    logits = alpha * torch.log(ref_probs) + rewards / (beta + gamma)
    return torch.softmax(logits, dim=-1)
