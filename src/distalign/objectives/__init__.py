"""Pure objective functions over log-prob / reward tensors. Imports nothing else of distalign.

Offline pairwise: dpo_loss, ipo_loss, hinge_loss, robust_dpo_loss, simpo_loss, rpo_loss, pmle_loss,
cpo_loss, frac_in_undesirable. Likelihood: sft_loss, reward_bt_loss, distill_loss.
KL on samples: kl_estimate, score_function_kl. The registry maps method names to objectives.
"""
from .cpo import cpo_loss, softplus_tau
from .kl import kl_estimate, leave_one_out_baseline, score_function_kl
from .likelihood import distill_loss, reward_bt_loss, sft_loss
from .pairwise import (dpo_log_ratio_margin, dpo_loss, frac_in_undesirable, hinge_loss, ipo_loss,
                       pmle_loss, robust_dpo_loss, rpo_loss, simpo_loss)
from .reverse_kl import reverse_kl_loss, reverse_kl_optimum, reverse_kl_shaped_reward
from .registry import PAIRWISE_OBJECTIVES, PairLogps, PairwiseObjective, get_pairwise_objective

__all__ = [
    "cpo_loss", "softplus_tau", "kl_estimate", "leave_one_out_baseline", "score_function_kl",
    "distill_loss", "reward_bt_loss", "sft_loss", "dpo_log_ratio_margin", "dpo_loss",
    "frac_in_undesirable", "hinge_loss", "ipo_loss", "pmle_loss", "robust_dpo_loss", "rpo_loss",
    "simpo_loss", "reverse_kl_loss", "reverse_kl_optimum", "reverse_kl_shaped_reward",
    "PAIRWISE_OBJECTIVES", "PairLogps", "PairwiseObjective", "get_pairwise_objective",
]
