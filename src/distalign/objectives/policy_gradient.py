"""Policy-gradient objectives for online methods: pure functions of (B, T) token tensors with masks.

Shapes: B completions, T response tokens (right-padded); `mask` (B, T) is 1 on response tokens
(up to and including EOS) and 0 on padding. `token_logps` are log pi(y_t | x, y_<t) at the sampling
temperature; `old_token_logps` the same under the policy that sampled (no grad); `ref_token_logps`
under pi0. Advantage functions return (B, T) tensors; losses return per-example (B,) tensors whose
`.mean()` is the batch loss (see `aggregate_token_losses` for the length normalisations).

Statistics over a whole batch (whitening, the REINFORCE baseline) take an optional `sum_processes`, a
function that sums a tensor over the processes of a run: with it they are the statistics of the global
batch, so N processes compute what one process with all their rows would.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kl import leave_one_out_baseline

LENGTH_NORMS = ("sequence", "token", "constant")
SumOverProcesses = Callable[[Tensor], Tensor]


def _summed(x: Tensor, sum_processes: SumOverProcesses | None) -> Tensor:
    return x if sum_processes is None else sum_processes(x)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(values * mask) / sum(mask), over `dim` (all elements if None); empty rows give 0."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  sum_processes: SumOverProcesses | None = None) -> Tensor:
    """(x - mean) / std over the masked entries (PPO advantage whitening; Huang et al. 2024 "N+ details").

    The variance is the unbiased masked variance; with `shift_mean=False` only the scale changes.
    Padding positions come back as 0. Mean and variance are over every process's entries with
    `sum_processes` (two reductions: the variance is taken around the global mean).
    """
    totals = _summed(torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)]), sum_processes)
    count = totals[1]
    mean = totals[0] / count.clamp(min=1)
    var = _summed(((values - mean).square() * mask).sum(), sum_processes) / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def aggregate_token_losses(token_losses: Tensor, mask: Tensor, length_norm: str = "sequence",
                           max_length: int | None = None, mean_length: Tensor | float | None = None) -> Tensor:
    """(B, T) per-token losses -> (B,) per-example losses whose mean is the batch loss.

    - "sequence" (GRPO, Shao et al. 2024 Eq. 3): l_i = (1/|y_i|) sum_t l_it; long answers weigh less per token.
    - "token" (DAPO, Yu et al. 2025 Eq. 8): l_i = sum_t l_it / mean_j |y_j|, so mean_i l_i is the
      mean over all tokens of the batch. `mean_length` defaults to this batch's; a loop passes that
      of the whole optimizer step (all micro-batches, all processes), so every token weighs alike.
    - "constant" (Dr. GRPO, Liu et al. 2025): l_i = sum_t l_it / L with a constant L (`max_length`,
      default T), removing the length bias of "sequence".
    """
    summed = (token_losses * mask).sum(-1)
    if length_norm == "sequence":
        return summed / mask.sum(-1).clamp(min=1)
    if length_norm == "token":
        if mean_length is None:
            return summed * mask.shape[0] / mask.sum().clamp(min=1)
        return summed / mean_length
    if length_norm == "constant":
        return summed / float(max_length or mask.shape[-1])
    raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")


def clipped_surrogate_loss(token_logps: Tensor, old_token_logps: Tensor, advantages: Tensor, mask: Tensor,
                           clip_eps: float = 0.2, clip_eps_high: float | None = None,
                           length_norm: str = "sequence", max_length: int | None = None,
                           mean_length: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), per token, then `aggregate_token_losses`.

    l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),  rho_t = exp(log pi - log pi_old).
    `clip_eps_high` (DAPO's "clip-higher") defaults to `clip_eps`. With rho = 1 (first update on a
    fresh rollout) the gradient is A_t grad log pi(y_t): plain REINFORCE. Returns the (B,) loss and
    the (B, T) float indicator of tokens whose ratio was clipped (for the clip fraction).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(token_logps - old_token_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * advantages
    token_losses = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).to(token_logps.dtype) * mask
    return aggregate_token_losses(token_losses, mask, length_norm, max_length, mean_length), was_clipped


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float = 0.2) -> Tensor:
    """PPO value loss with clipping (Huang et al. 2024, detail 9): per-sequence masked mean of
    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2). Shapes (B, T); returns (B,)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    token_losses = 0.5 * torch.maximum((values - returns).square(), (clipped_values - returns).square())
    return masked_mean(token_losses, mask, dim=-1)


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16), right-padded responses.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last response token is 0),
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Shapes (B, T); padding gives 0.
    The loop runs over T (response length), never over examples.
    """
    token_rewards, values = token_rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def kl_penalized_token_rewards(scores: Tensor, token_logps: Tensor, ref_token_logps: Tensor | None, mask: Tensor,
                               kl_coef: float) -> Tensor:
    """RLHF per-token reward (Ziegler et al. 2019; Ouyang et al. 2022 Eq. 2):
    r_t = -kl_coef (log pi(y_t) - log pi0(y_t)), plus the sequence score R(x, y) on the last
    response token. scores (B,); token tensors (B, T); returns (B, T). No reference or kl_coef = 0: the
    score alone (the trainers load no reference then)."""
    if ref_token_logps is None or kl_coef == 0:
        token_rewards = torch.zeros_like(token_logps) * mask
    else:
        token_rewards = -kl_coef * (token_logps - ref_token_logps) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return token_rewards.scatter_add(1, last[:, None], scores[:, None].to(token_rewards.dtype))


def k3_token_kl(token_logps: Tensor, ref_token_logps: Tensor) -> Tensor:
    """GRPO's per-token KL (Shao et al. 2024 Eq. 4): pi0/pi - log(pi0/pi) - 1 >= 0, differentiable in pi."""
    log_ratio = ref_token_logps - token_logps
    return torch.expm1(log_ratio) - log_ratio


def sequence_kl_penalized_scores(scores: Tensor, token_logps: Tensor, ref_token_logps: Tensor | None,
                                 mask: Tensor, kl_coef: float) -> Tensor:
    """R(x, y) - kl_coef (log pi(y|x) - log pi0(y|x)): the sequence-level KL-regularised return of
    REINFORCE / RLOO for RLHF (Ahmadian et al. 2024, Sec. 3). No reference or kl_coef = 0: R itself."""
    if ref_token_logps is None or kl_coef == 0:
        return scores
    return scores - kl_coef * ((token_logps - ref_token_logps) * mask).sum(-1)


def reinforce_advantages(returns: Tensor, sum_processes: SumOverProcesses | None = None) -> Tensor:
    """REINFORCE with the batch-mean baseline (Williams 1992): A_i = R_i - mean_j R_j. (B,) -> (B,).

    The baseline includes R_i itself, which biases the gradient by a factor (1 - 1/B); RLOO removes that.
    With `sum_processes` the mean is over every process's returns."""
    if sum_processes is None:
        return returns - returns.mean()
    totals = sum_processes(torch.stack([returns.sum(), returns.new_tensor(float(len(returns)))]))
    return returns - totals[0] / totals[1]


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024 Eq. 6): A_i = R_i - mean of the other k-1 returns
    of the same prompt. Groups are k consecutive rows. (B,) -> (B,)."""
    return returns - leave_one_out_baseline(returns, group_size)


def grpo_advantages(scores: Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO outcome supervision (Shao et al. 2024, Sec. 4.1.2): A_i = (R_i - mean_g R) / (std_g R + eps).

    std is the unbiased group standard deviation; `scale_rewards=False` is Dr. GRPO's (Liu et al. 2025)
    centring without the division. (B,) -> (B,)."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale_rewards and group_size > 1:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)
