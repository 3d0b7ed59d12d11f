"""Constrained Preference Optimization (seed 003): DPO with a constraint that the policy itself
prefers the chosen response, so training cannot settle in the undesirable space U."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softplus_tau(z: Tensor, tau: float) -> Tensor:
    """softplus_tau(z) = log(1 + exp(tau z)) / tau: a smooth max(z, 0) that sharpens as tau grows."""
    return F.softplus(tau * z) / tau


def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float = 0.1,
             alpha: float = 1.0, tau: float = 10.0, margin: float = 0.0,
             variant: str = "full") -> Tensor:
    """CPO with length-normalised deltas d_pi = s+/|y+| - s-/|y-| and d_ref = r+/|y+| - r-/|y-|.

    full:   -log sigma(beta d_pi - beta d_ref - (beta/alpha) softplus_tau(g - d_ref)).
            When the reference already prefers chosen by more than g the penalty vanishes (DPO);
            when d_ref << 0 the argument is ~ beta d_pi - beta g (alpha=1): the policy must itself
            prefer the chosen response by g, not merely less than the reference prefers rejected.
    simple: -log sigma(beta d_pi - g (1/|rbar+| + 1/|rbar-|)), rbar = r/|y| the reference's mean
            token log-prob: a reference-free margin that grows where the reference is confident.
            (SPEC writes the margin as g(1/rbar+ + 1/rbar-); rbar < 0, so we take magnitudes to keep
            the margin a positive demand.)
    clip:   -log sigma(beta (d_pi - max(d_ref, 0))): the reference's head start is never negative.
    g is `margin`. Shapes: all (B,); returns (B,).
    """
    d_pi = policy_chosen_logps / chosen_lengths - policy_rejected_logps / rejected_lengths
    d_ref = ref_chosen_logps / chosen_lengths - ref_rejected_logps / rejected_lengths
    if variant == "full":
        logits = beta * (d_pi - d_ref) - (beta / alpha) * softplus_tau(margin - d_ref, tau)
    elif variant == "simple":
        rbar_chosen = (ref_chosen_logps / chosen_lengths).abs().clamp_min(1e-6)
        rbar_rejected = (ref_rejected_logps / rejected_lengths).abs().clamp_min(1e-6)
        logits = beta * d_pi - margin * (1.0 / rbar_chosen + 1.0 / rbar_rejected)
    elif variant == "clip":
        logits = beta * (d_pi - torch.clamp(d_ref, min=0.0))
    else:
        raise ValueError(f"variant must be 'full', 'simple' or 'clip', got {variant!r}")
    return -F.logsigmoid(logits)
