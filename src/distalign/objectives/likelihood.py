"""Likelihood-style objectives: SFT, Bradley-Terry reward modelling and preference distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Masked negative log-likelihood per example: -sum_t m_t log pi(y_t|x,y<t) / sum_t m_t.

    token_logps, mask: (B, T); only response tokens carry mask 1. Returns (B,). Rows with no
    response token give 0 rather than NaN.
    """
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def reward_bt_loss(reward_chosen: Tensor, reward_rejected: Tensor, margin: Tensor | float = 0.0,
                   l2: float = 0.0, center_rewards_coefficient: float = 0.0) -> Tensor:
    """Bradley-Terry reward loss (seed 001 Eq. 9) with two optional penalties:

        -log sigma(R+ - R- - m) + l2 (R+^2 + R-^2) + c (R+ + R-)^2

    `margin` m (scalar or (B,)) demands a gap, as in Llama-2's margin loss. `l2` is plain weight on the
    rewards' size: since R+^2 + R-^2 = ((R+ + R-)^2 + (R+ - R-)^2) / 2 it pulls the pair's centre to 0
    *and* shrinks the margin R+ - R- that BT is fitting (a bias toward P(y+ > y-) = 1/2).
    `center_rewards_coefficient` c is TRL's `RewardConfig.center_rewards_coefficient` (Eisenstein et al.
    2023): it penalises only the centre, fixing BT's free per-prompt shift without touching the margin.
    Shapes (B,); returns (B,); its batch mean is TRL's loss for the same c.
    """
    loss = -F.logsigmoid(reward_chosen - reward_rejected - margin)
    if l2:
        loss = loss + l2 * (reward_chosen.square() + reward_rejected.square())
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (reward_chosen + reward_rejected).square()
    return loss


def distill_loss(policy_a_logps: Tensor, policy_b_logps: Tensor, reward_a: Tensor, reward_b: Tensor,
                 gamma: float = 1.0) -> Tensor:
    """Preference distillation (seed 001 Eq. 11): BCE(p, q) with soft label p = sigma(Rhat(a) - Rhat(b))
    and model probability q = sigma(gamma (log pi(a|x) - log pi(b|x))).

    BCE(p, q) = -p log q - (1-p) log(1-q), written with logsigmoid so extreme log-ratios stay finite.
    Rewards are treated as fixed labels (no gradient flows into them). Shapes (B,); returns (B,).
    The beta*KL(pi||pi0) term of Eq. 11 is separate (objectives.kl).
    """
    p = torch.sigmoid((reward_a - reward_b).detach())
    z = gamma * (policy_a_logps - policy_b_logps)
    return -p * F.logsigmoid(z) - (1.0 - p) * F.logsigmoid(-z)
