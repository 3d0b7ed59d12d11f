"""Online methods: name -> how advantages are formed, and what the method needs from a rollout.

Every online method updates the policy with the same clipped surrogate over per-token advantages
(`clipped_surrogate_loss`; with one update per rollout the ratio is 1 and it is plain REINFORCE).
They differ in how a rollout becomes advantages, whether a value head or the reference is used, how
per-token losses are length-normalised, and whether a KL term sits in the loss (GRPO). Adding a
method = one advantage function + one `ONLINE_OBJECTIVES` entry + one YAML config.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .kl import leave_one_out_baseline
from .policy_gradient import (
    SumOverProcesses,
    aggregate_token_losses,
    clipped_surrogate_loss,
    clipped_value_loss,
    gae,
    grpo_advantages,
    k3_token_kl,
    kl_penalized_token_rewards,
    masked_mean,
    masked_whiten,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl_penalized_scores,
)
from .reverse_kl import reverse_kl_shaped_reward


@dataclass
class RolloutTensors:
    """What the objectives see of a rollout. Token tensors are (B, T), rows grouped by prompt in
    consecutive blocks of `group_size`. `advantages` / `returns` are filled by `prepare`."""
    scores: Tensor                              # (B,) reward of each completion
    token_logps: Tensor                         # (B, T) log-probs under the sampling policy, no grad
    mask: Tensor                                # (B, T) 1 on response tokens
    ref_token_logps: Tensor | None = None    # (B, T) under pi0
    values: Tensor | None = None             # (B, T) value head at sampling time
    group_size: int = 1
    advantages: Tensor | None = None         # (B, T)
    returns: Tensor | None = None            # (B, T) value targets (PPO)

    def select(self, rows: Tensor) -> RolloutTensors:
        """The minibatch of `rows` (index tensor); every tensor field is indexed on its first axis."""
        picked = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return replace(self, **picked)


def _per_token(sequence_advantages: Tensor, mask: Tensor) -> Tensor:
    return sequence_advantages[:, None].to(mask.dtype) * mask


def ppo_advantages(r: RolloutTensors, kl_coef: float = 0.05, gamma: float = 1.0, lam: float = 0.95,
                   whiten_advantages: bool = True, sum_processes: SumOverProcesses | None = None
                   ) -> tuple[Tensor, Tensor]:
    """RLHF-PPO: per-token KL-penalised reward with the score on the last token, GAE, whitening
    (over the global batch with `sum_processes`)."""
    token_rewards = kl_penalized_token_rewards(r.scores, r.token_logps, r.ref_token_logps, r.mask, kl_coef)
    advantages, returns = gae(token_rewards, r.values, r.mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, r.mask, sum_processes=sum_processes)
    return advantages, returns


def reinforce_method_advantages(r: RolloutTensors, kl_coef: float = 0.05,
                                sum_processes: SumOverProcesses | None = None) -> tuple[Tensor, None]:
    """REINFORCE on the KL-regularised sequence return, baseline = the mean over the (global) batch."""
    returns = sequence_kl_penalized_scores(r.scores, r.token_logps, r.ref_token_logps, r.mask, kl_coef)
    return _per_token(reinforce_advantages(returns, sum_processes), r.mask), None


def rloo_method_advantages(r: RolloutTensors, kl_coef: float = 0.05) -> tuple[Tensor, None]:
    """RLOO on the KL-regularised sequence return, leave-one-out baseline within each prompt's group."""
    returns = sequence_kl_penalized_scores(r.scores, r.token_logps, r.ref_token_logps, r.mask, kl_coef)
    return _per_token(rloo_advantages(returns, r.group_size), r.mask), None


def grpo_method_advantages(r: RolloutTensors, scale_rewards: bool = True) -> tuple[Tensor, None]:
    """GRPO: group-normalised scores on every token; the KL is a k3 term in the loss, not in the reward."""
    return _per_token(grpo_advantages(r.scores, r.group_size, scale_rewards), r.mask), None


def reverse_kl_method_advantages(r: RolloutTensors, kl_coef: float = 0.05,
                                 entropy_coef: float = 0.0) -> tuple[Tensor, None]:
    """Reverse KL (seed 001 Eq. 16) with beta = kl_coef, gamma = entropy_coef: the sequence-level shaped
    reward R - (beta+gamma) log pi + beta log pi0 (the per-token shaping summed over the response),
    minus the leave-one-out baseline of its group, as in `reverse_kl_loss`."""
    policy_logps = (r.token_logps * r.mask).sum(-1)
    ref_logps = (r.ref_token_logps * r.mask).sum(-1) if r.ref_token_logps is not None else 0.0 * policy_logps
    shaped = reverse_kl_shaped_reward(r.scores, policy_logps, ref_logps, kl_coef, entropy_coef)
    return _per_token(shaped - leave_one_out_baseline(shaped, r.group_size), r.mask), None


@dataclass(frozen=True)
class OnlineObjective:
    """An online method: its advantage function and what it needs.

    `length_norm` is the default way per-token losses become per-example losses: "constant" keeps the
    sequence-level score-function estimator unbiased (sum over tokens, divided by a constant),
    "sequence" is GRPO's per-response mean, "token" PPO's mean over all tokens of the batch.
    """
    advantages: Callable[..., tuple[Tensor, Tensor | None]]
    needs_value_head: bool = False
    uses_reference: bool = True
    min_group_size: int = 1
    kl_in_loss: bool = False
    length_norm: str = "constant"

    def hyperparameters(self) -> dict:
        params = list(inspect.signature(self.advantages).parameters.values())[1:]
        return {p.name: p.default for p in params if p.name != "sum_processes"}

    def needs_reference(self, hparams: dict) -> bool:
        """Reference log-probs are computed only when a KL term can be non-zero."""
        return self.uses_reference and hparams.get("kl_coef", 0.0) != 0.0

    def prepare(self, rollout: RolloutTensors, hparams: dict,
                sum_processes: SumOverProcesses | None = None) -> RolloutTensors:
        """Fill `advantages` (and `returns`) once per rollout; hparams are filtered to the function's own.
        `sum_processes` reaches the advantage functions whose statistics span the batch."""
        own = {k: v for k, v in hparams.items() if k in self.hyperparameters()}
        if "sum_processes" in inspect.signature(self.advantages).parameters:
            own["sum_processes"] = sum_processes
        with torch.no_grad():
            advantages, returns = self.advantages(rollout, **own)
        return replace(rollout, advantages=advantages, returns=returns)

    def loss(self, token_logps: Tensor, values: Tensor | None, batch: RolloutTensors, clip_eps: float = 0.2,
             clip_eps_high: float | None = None, length_norm: str | None = None,
             max_length: int | None = None, kl_coef: float = 0.0, vf_coef: float = 0.1,
             vf_clip: float = 0.2, mean_length: Tensor | float | None = None) -> tuple[Tensor, dict]:
        """Per-example (B,) loss on a prepared minibatch and scalar diagnostics (tensors, no host sync).
        `mean_length`: the "token" normaliser (`aggregate_token_losses`), default this minibatch's."""
        norm = length_norm or self.length_norm
        losses, clipped = clipped_surrogate_loss(token_logps, batch.token_logps, batch.advantages, batch.mask,
                                                 clip_eps, clip_eps_high, norm, max_length, mean_length)
        metrics = {"policy_loss": losses.detach().mean(), "clip_fraction": masked_mean(clipped, batch.mask)}
        if self.kl_in_loss and kl_coef and batch.ref_token_logps is not None:
            kl = aggregate_token_losses(k3_token_kl(token_logps, batch.ref_token_logps), batch.mask, norm,
                                        max_length, mean_length)
            losses = losses + kl_coef * kl
            metrics["k3_kl"] = kl.detach().mean()
        if self.needs_value_head:
            value_losses = clipped_value_loss(values, batch.values, batch.returns, batch.mask, vf_clip)
            losses = losses + vf_coef * value_losses
            metrics["value_loss"] = value_losses.detach().mean()
        return losses, metrics


ONLINE_OBJECTIVES: dict[str, OnlineObjective] = {
    "ppo": OnlineObjective(ppo_advantages, needs_value_head=True, length_norm="token"),
    "reinforce": OnlineObjective(reinforce_method_advantages),
    "rloo": OnlineObjective(rloo_method_advantages, min_group_size=2),
    "grpo": OnlineObjective(grpo_method_advantages, min_group_size=2, kl_in_loss=True, length_norm="sequence"),
    "reverse_kl": OnlineObjective(reverse_kl_method_advantages),
}


def get_online_objective(name: str) -> OnlineObjective:
    try:
        return ONLINE_OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown online method {name!r}; valid: {sorted(ONLINE_OBJECTIVES)}") from None
