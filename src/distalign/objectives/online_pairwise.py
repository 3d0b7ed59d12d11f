"""Objectives of the online pairwise and iterative methods: REBEL, SPIN, SPAC, RPO with demonstrations,
the IRL / AIHF reward loss and Nash mirror descent (exact on a table; Nash-MD-PG on sampled responses).
Pure functions of log-prob / reward tensors.

Notation: a, b are two responses to the same prompt; `policy_*_logps` are summed response log-probs
log pi(y|x) (B,); `old_*` the same under the policy that generated the samples (no grad), `ref_*`
under the reference. The online forms of DPO, PMLE and preference distillation need no new function:
the trainer orients fresh samples with `orient_pairs` and calls `dpo_loss` / `pmle_loss` /
`distill_loss` / `score_function_kl`. Functions mixing two data sets of different sizes (demonstrations
and preference pairs) return a scalar: the weighted sum of the two batch means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kl import score_function_kl
from .pairwise import dpo_loss


def orient_pairs(a: Tensor, b: Tensor, a_wins: Tensor) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) from two responses and a (B,) bool label "a is preferred"."""
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def rebel_loss(policy_a_logps: Tensor, policy_b_logps: Tensor, old_a_logps: Tensor, old_b_logps: Tensor,
               reward_a: Tensor, reward_b: Tensor, eta: float = 1.0) -> Tensor:
    """REBEL (Gao et al. 2024; seed 001 Eq. 10 with pi_t in place of pi0, as REBEL iterates):

        ( [log pi(a)/pi_t(a) - log pi(b)/pi_t(b)] - eta (R(a) - R(b)) )^2

    pi_t is the policy that generated a and b (its log-probs stored at rollout). Rewards are labels:
    no gradient flows into them. Shapes (B,); returns (B,).

    Where eta sits: seed 001 Eq. 10 (used here) scales the reward gap by eta; the REBEL paper (Gao et al.
    2024, Eq. 2) writes ((1/eta) [log-ratio gap] - (R(a) - R(b)))^2 instead. The two are the same loss up
    to a constant factor, REBEL's = this / eta^2, so they have the same minimiser and eta means the same
    (the log-ratio gap is fitted to eta times the reward gap); gradients differ by 1/eta^2, which plain SGD
    feels as a learning-rate change and AdamW hardly at all (its steps are invariant to a loss scale up to
    `adam_eps` and gradient clipping). At eta = 1 (REBEL's and seed 001's setting) they are identical.
    """
    log_ratio_gap = (policy_a_logps - old_a_logps.detach()) - (policy_b_logps - old_b_logps.detach())
    return (log_ratio_gap - eta * (reward_a - reward_b).detach()).square()


def spin_loss(policy_demo_logps: Tensor, policy_sample_logps: Tensor, prev_demo_logps: Tensor,
              prev_sample_logps: Tensor, beta: float = 0.1) -> Tensor:
    """SPIN (Chen et al. 2024; tutorial seed 002 Eq. 12 with l = -log sigma): the demonstration y beats the
    previous iterate's own sample y', with the previous iterate theta_t as the reference:

        -log sigma( beta log pi(y)/pi_t(y) - beta log pi(y')/pi_t(y') ).   Shapes (B,); returns (B,).
    """
    return dpo_loss(policy_demo_logps, policy_sample_logps, prev_demo_logps.detach(),
                    prev_sample_logps.detach(), beta)


def spac_loss(policy_demo_logps: Tensor, policy_sample_logps: Tensor, ref_demo_logps: Tensor,
              ref_sample_logps: Tensor, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1,
              alpha: float = 1.0) -> Tensor:
    """SPAC (Ji et al. 2024; tutorial seed 002, end of §V-B, the DPO form of AIHF Eq. 24):

        mean_demo DPO_beta(y_demo > y' ~ pi_t) + alpha mean_pairs DPO_beta(y_w > y_l),

    both against the fixed reference pi_ref. Demo tensors (B_d,), pair tensors (B_p,); returns a scalar.
    """
    demo = dpo_loss(policy_demo_logps, policy_sample_logps, ref_demo_logps, ref_sample_logps, beta)
    pairs = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return demo.mean() + alpha * pairs.mean()


def rpo_demos_loss(policy_demo_logps: Tensor, demo_lengths: Tensor, policy_chosen_logps: Tensor,
                   policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                   beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """RPO with a demonstration data set (Liu et al. 2024; tutorial seed 002 §V-B, the direct form of AIHF):

        mean_demo [-log pi(y|x) / |y|] + alpha mean_pairs DPO_beta(y_w > y_l).

    The NLL is per token so alpha does not scale with length. Demo tensors (B_d,), pairs (B_p,); scalar.
    """
    nll = -(policy_demo_logps / demo_lengths).mean()
    pairs = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return nll + alpha * pairs.mean()


def aihf_reward_loss(reward_demo: Tensor, reward_sample: Tensor, reward_chosen: Tensor | None = None,
                     reward_rejected: Tensor | None = None, demo_weight: float = 1.0,
                     alpha: float = 1.0) -> Tensor:
    """Reward step of IRL (tutorial seed 002 Eq. 21a) and AIHF (Eq. 24a), with l(z) = log sigma(z):

        demo_weight * mean_demo[-log sigma(r(y_demo) - r(y'))] + alpha * mean_pairs[-log sigma(r(y_w) - r(y_l))]

    y' ~ pi_t is the current policy's sample for the demonstration's prompt. IRL: no pairs (or alpha = 0).
    Demo tensors (B_d,), pair tensors (B_p,); returns a scalar.
    """
    loss = demo_weight * -F.logsigmoid(reward_demo - reward_sample).mean()
    if reward_chosen is not None and alpha:
        loss = loss + alpha * -F.logsigmoid(reward_chosen - reward_rejected).mean()
    return loss


def geometric_mixture(policy_logps: Tensor, ref_logps: Tensor, mix: float) -> Tensor:
    """log pi_mix(y) = (1 - mix) log pi(y) + mix log pi_ref(y) - log Z over the last axis (K responses).

    Nash-MD's regularised opponent (Munos et al. 2024, Sec. 6) with mix = eta * tau. (..., K) -> (..., K).
    """
    return torch.log_softmax((1.0 - mix) * policy_logps + mix * ref_logps, dim=-1)


def nash_md_objective(policy_logps: Tensor, mix_logps: Tensor, pref: Tensor, eta: float) -> Tensor:
    """Loss of one Nash mirror-descent step (Munos et al. 2024, Eq. 9; tutorial seed 002 Protocol 7):

        -( eta E_{y ~ pi, y' ~ pi_mix}[P(y > y')] - KL(pi || pi_mix) )

    over an explicit response set: policy_logps, mix_logps (..., K); pref (..., K, K) with
    pref[..., i, j] = P(y_i > y_j). Its minimiser is `nash_md_step`. Returns (...,).
    """
    probs, mix_probs = policy_logps.exp(), mix_logps.exp()
    win = torch.einsum("...i,...ij,...j->...", probs, pref, mix_probs)
    kl = (probs * (policy_logps - mix_logps)).sum(-1)
    return -(eta * win - kl)


def nash_md_step(policy_logps: Tensor, ref_logps: Tensor, pref: Tensor, eta: float, tau: float) -> Tensor:
    """The exact Nash-MD update (Munos et al. 2024, Eq. 10):

        pi_{t+1}(y) ∝ pi_mix(y) exp(eta P(y > pi_mix)),   pi_mix ∝ pi_t^(1 - eta tau) pi_ref^(eta tau),

    with P(y > pi_mix) = sum_y' pi_mix(y') P(y > y'). It converges (last iterate) to the Nash equilibrium
    of the tau-regularised preference game. Shapes as in `nash_md_objective`; returns log pi_{t+1}.
    """
    mix_logps = geometric_mixture(policy_logps, ref_logps, eta * tau)
    win_vs_mix = (pref @ mix_logps.exp().unsqueeze(-1)).squeeze(-1)
    return torch.log_softmax(mix_logps + eta * win_vs_mix, dim=-1)


def nash_md_pg_loss(policy_logps: Tensor, ref_logps: Tensor | None, pref: Tensor, tau: float = 0.0,
                    group_size: int = 1) -> Tensor:
    """Nash-MD-PG (Munos et al. 2024, Sec. 7; tutorial seed 002 Protocol 7): the policy-gradient form of a
    Nash mirror-descent step for a language model, on y ~ pi(.|x) and its opponent y' ~ pi_mix(.|x):

        -(P(y > y' | x) - 1/2) log pi(y|x)  +  tau (l - b) log pi(y|x),   l = log pi(y|x) - log pi_ref(y|x)

    Its gradient is an unbiased estimate of -grad_pi [P(pi > pi_mix) - tau KL(pi || pi_ref)] with the opponent
    pi_mix (the geometric mixture pi^(1-beta) pi_ref^beta, sampled by `training.sampling.MixtureSampler`)
    held fixed. P is a label (no gradient): sigma(R(y) - R(y')) or a judge's, possibly non-transitive. The
    baseline 1/2 is P's value when pi = pi_mix (the symmetric game's value); like any constant it adds no
    bias because E_pi[grad log pi] = 0. The KL term is `score_function_kl` (b = leave-one-out mean of l over
    each prompt's `group_size` samples). Shapes (B,); ref_logps may be None when tau = 0; returns (B,).
    """
    loss = -(pref.detach() - 0.5) * policy_logps
    if tau:
        loss = loss + tau * score_function_kl(policy_logps, ref_logps, group_size)
    return loss
