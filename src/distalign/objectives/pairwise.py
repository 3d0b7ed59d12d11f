"""Offline pairwise objectives over sequence log-probs of (prompt, chosen, rejected) triples.

Notation (SPEC §1-2): s+ / s- are the policy's summed response log-probs log pi(y|x) of the chosen
and rejected responses, r+ / r- the reference's, |y| the number of response tokens. Every function
returns a per-example loss of shape (B,); the caller reduces. All use logsigmoid / softplus so that
log-ratios of +-1e3 give finite values and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_log_ratio_margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                         ref_chosen_logps: Tensor, ref_rejected_logps: Tensor) -> Tensor:
    """h = (s+ - r+) - (s- - r-), the implicit-reward margin every DPO-family loss is a function of."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7; tutorial seed 002 Eq. 13): -log sigma(beta * h).

    Shapes: all inputs (B,) summed response log-probs; returns (B,). At h = 0 the loss is log 2.
    """
    h = dpo_log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def length_normalised_delta(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
                            rejected_lengths: Tensor) -> Tensor:
    """d = s+/|y+| - s-/|y-|: the chosen-minus-rejected gap of mean per-token log-probs (SimPO, CPO, IPO's
    default). With reference log-probs in place of the policy's it is CPO's d_ref. Shapes (B,)."""
    return chosen_logps / chosen_lengths - rejected_logps / rejected_lengths


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, chosen_lengths: Tensor,
             rejected_lengths: Tensor, beta: float = 0.1, per_token: bool = True) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17; tutorial seed 002): (h - 1/(2 beta))^2, beta playing IPO's tau.

    per_token (default): h = (s+ - r+)/|y+| - (s- - r-)/|y-|, the per-token averaged log-ratios of the
    IPO paper's experiments and of TRL's `loss_type="ipo"`, so the target 1/(2 beta) does not scale with
    response length; per_token=False: the summed margin h = (s+ - r+) - (s- - r-).
    A squared loss toward a finite margin, so it does not push h to infinity on deterministic labels.
    """
    if per_token:
        h = length_normalised_delta(policy_chosen_logps - ref_chosen_logps,
                                    policy_rejected_logps - ref_rejected_logps, chosen_lengths, rejected_lengths)
    else:
        h = dpo_log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023): max(0, 1 - beta * h)."""
    h = dpo_log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1.0 - beta * h)


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1,
                    epsilon: float = 0.1, variant: str = "conservative") -> Tensor:
    """DPO under a known label-flip rate epsilon.

    conservative (cDPO, label smoothing): -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
    robust (rDPO, Chowdhury et al. 2024, Eq. 8): [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps),
    an unbiased estimate of the clean-label DPO loss.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon}")
    h = dpo_log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    agree, flip = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    if variant == "conservative":
        return -(1.0 - epsilon) * agree - epsilon * flip
    if variant == "robust":
        return (-(1.0 - epsilon) * agree + epsilon * flip) / (1.0 - 2.0 * epsilon)
    raise ValueError(f"variant must be 'conservative' or 'robust', got {variant!r}")


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float = 2.0,
               margin: float = 0.5) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): -log sigma(beta * (s+/|y+| - s-/|y-|) - margin). No reference."""
    delta = length_normalised_delta(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    return -F.logsigmoid(beta * delta - margin)


def rpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, chosen_lengths: Tensor,
             beta: float = 0.1, alpha: float = 1.0, nll: str = "batch") -> Tensor:
    """RPO (Liu et al. 2024; tutorial seed 002 §V-B): DPO + alpha * NLL of the chosen response.

    The NLL is per token, so alpha does not scale with response length:
    - nll="batch" (default; TRL's `loss_type=["sigmoid", "sft"]`): one token mean over the batch,
      -sum_i s+_i / sum_i |y+_i|, returned per example as -s+_i / mean_j |y+_j| so that the batch mean of
      the (B,) losses is exactly that token mean (long chosen responses weigh more);
    - nll="example": the mean of per-example token means, -s+_i / |y+_i|.
    "The batch" is the micro-batch the caller reduces (per process, per accumulation step), as in TRL.
    """
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    if nll == "batch":
        return dpo - alpha * policy_chosen_logps / chosen_lengths.mean()
    if nll == "example":
        return dpo - alpha * policy_chosen_logps / chosen_lengths
    raise ValueError(f"nll must be 'batch' or 'example', got {nll!r}")


def pmle_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, gamma: float = 1.0) -> Tensor:
    """Preference MLE (seed 001 Eq. 5, preference term): -log sigma(gamma * (s+ - s-)).

    No reference log-ratio inside the sigmoid: the policy itself is the preference model
    P(a > b | x) = sigma(gamma (log pi(a|x) - log pi(b|x))). The beta*KL(pi||pi0) term of Eq. 5 is
    separate (objectives.kl), estimated on fresh policy samples when beta > 0.
    """
    return -F.logsigmoid(gamma * (policy_chosen_logps - policy_rejected_logps))


def frac_in_undesirable(delta_policy: Tensor, delta_ref: Tensor) -> Tensor:
    """Share of pairs in CPO's undesirable space U = {delta_pi < 0 and delta_pi > delta_ref} (seed 003).

    delta = log-prob of chosen minus rejected; the trainers pass the length-normalised deltas of CPO's
    constraint (`length_normalised_delta`). Inside U the policy gained on the reference (DPO's loss is
    below log 2 when lengths are equal) while it still prefers the rejected response. Returns a scalar.
    """
    inside = (delta_policy < 0) & (delta_policy > delta_ref)
    return inside.to(delta_policy.dtype).mean()
