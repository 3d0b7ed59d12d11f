"""Pure objective functions over log-prob / reward tensors. Imports nothing else of distalign.

Offline pairwise: dpo_loss, ipo_loss, hinge_loss, robust_dpo_loss, simpo_loss, rpo_loss, pmle_loss,
cpo_loss, frac_in_undesirable, length_normalised_delta. Likelihood: sft_loss, reward_bt_loss, distill_loss.
KL on samples: kl_estimate, sequence_kl_estimate, score_function_kl. Reverse KL: reverse_kl_shaped_reward / _loss / _optimum.
Policy gradient (online I): clipped surrogate, value loss, GAE, REINFORCE / RLOO / GRPO advantages.
Online pairwise (online II): REBEL, SPIN, SPAC, RPO with demonstrations, AIHF reward loss, Nash-MD
(tabular step and the policy-gradient Nash-MD-PG).
The registries map method names to objectives (offline: registry.py; online: online_registry.py).
"""
from .cpo import cpo_loss, simple_margin, softplus_tau
from .kl import kl_estimate, leave_one_out_baseline, score_function_kl, sequence_kl_estimate
from .likelihood import distill_loss, reward_bt_loss, sft_loss
from .online_pairwise import (aihf_reward_loss, geometric_mixture, nash_md_objective, nash_md_pg_loss,
                              nash_md_step, orient_pairs, rebel_loss, rpo_demos_loss, spac_loss, spin_loss)
from .online_registry import ONLINE_OBJECTIVES, OnlineObjective, RolloutTensors, get_online_objective
from .pairwise import (dpo_log_ratio_margin, dpo_loss, frac_in_undesirable, hinge_loss, ipo_loss,
                       length_normalised_delta, pmle_loss, robust_dpo_loss, rpo_loss, simpo_loss)
from .policy_gradient import (aggregate_token_losses, clipped_surrogate_loss, clipped_value_loss, gae,
                              grpo_advantages, k3_token_kl, kl_penalized_token_rewards, masked_mean, masked_whiten,
                              reinforce_advantages, rloo_advantages, sequence_kl_penalized_scores)
from .registry import PAIRWISE_OBJECTIVES, PairLogps, PairwiseObjective, get_pairwise_objective
from .reverse_kl import reverse_kl_loss, reverse_kl_optimum, reverse_kl_shaped_reward

__all__ = [
    "cpo_loss", "simple_margin", "softplus_tau", "kl_estimate", "leave_one_out_baseline", "score_function_kl",
    "sequence_kl_estimate", "length_normalised_delta",
    "distill_loss", "reward_bt_loss", "sft_loss", "dpo_log_ratio_margin", "dpo_loss",
    "frac_in_undesirable", "hinge_loss", "ipo_loss", "pmle_loss", "robust_dpo_loss", "rpo_loss",
    "simpo_loss", "reverse_kl_loss", "reverse_kl_optimum", "reverse_kl_shaped_reward",
    "PAIRWISE_OBJECTIVES", "PairLogps", "PairwiseObjective", "get_pairwise_objective",
    "ONLINE_OBJECTIVES", "OnlineObjective", "RolloutTensors", "get_online_objective",
    "aggregate_token_losses", "clipped_surrogate_loss", "clipped_value_loss", "gae", "grpo_advantages",
    "k3_token_kl", "kl_penalized_token_rewards", "masked_mean", "masked_whiten", "reinforce_advantages",
    "rloo_advantages", "sequence_kl_penalized_scores",
    "aihf_reward_loss", "geometric_mixture", "nash_md_objective", "nash_md_pg_loss", "nash_md_step",
    "orient_pairs", "rebel_loss", "rpo_demos_loss", "spac_loss", "spin_loss",
]
