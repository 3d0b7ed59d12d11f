"""Name -> objective, and how a trainer feeds it. Adding a method = one objective + one entry here.

The offline trainer computes a `PairLogps` for each batch and calls `objective(pair_logps, **hp)`;
hyperparameters come from the config's `loss:` mapping and are checked against the function's own
keyword arguments, so a typo names the valid keys instead of being ignored.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .cpo import cpo_loss
from .pairwise import (dpo_loss, hinge_loss, ipo_loss, pmle_loss, robust_dpo_loss, rpo_loss,
                       simpo_loss)


@dataclass
class PairLogps:
    """Per-example sequence quantities for a batch of pairs; all (B,). Lengths are response token counts."""
    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen: Optional[Tensor] = None
    ref_rejected: Optional[Tensor] = None


def _with_ref(p: PairLogps) -> dict:
    return dict(policy_chosen_logps=p.policy_chosen, policy_rejected_logps=p.policy_rejected,
                ref_chosen_logps=p.ref_chosen, ref_rejected_logps=p.ref_rejected)


def _with_lengths(p: PairLogps) -> dict:
    return dict(chosen_lengths=p.chosen_lengths, rejected_lengths=p.rejected_lengths)


def _policy_only(p: PairLogps) -> dict:
    return dict(policy_chosen_logps=p.policy_chosen, policy_rejected_logps=p.policy_rejected)


@dataclass(frozen=True)
class PairwiseObjective:
    """A pairwise loss, the tensors it takes from `PairLogps`, and whether it needs a reference model."""
    loss: Callable[..., Tensor]
    tensors: Callable[[PairLogps], dict]
    needs_reference: bool

    def hyperparameters(self) -> dict:
        """Keyword arguments with defaults that are not tensors taken from PairLogps."""
        return {name: p.default for name, p in inspect.signature(self.loss).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def validate(self, hparams: dict, where: str = "loss") -> None:
        valid = self.hyperparameters()
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} for {self.loss.__name__}; valid: {sorted(valid)}")

    def __call__(self, pair_logps: PairLogps, **hparams) -> Tensor:
        return self.loss(**self.tensors(pair_logps), **hparams)


PAIRWISE_OBJECTIVES: dict[str, PairwiseObjective] = {
    "dpo": PairwiseObjective(dpo_loss, _with_ref, needs_reference=True),
    "ipo": PairwiseObjective(ipo_loss, _with_ref, needs_reference=True),
    "hinge": PairwiseObjective(hinge_loss, _with_ref, needs_reference=True),
    "robust_dpo": PairwiseObjective(robust_dpo_loss, _with_ref, needs_reference=True),
    "rpo": PairwiseObjective(rpo_loss, lambda p: dict(_with_ref(p), chosen_lengths=p.chosen_lengths),
                             needs_reference=True),
    "cpo": PairwiseObjective(cpo_loss, lambda p: dict(_with_ref(p), **_with_lengths(p)), needs_reference=True),
    "simpo": PairwiseObjective(simpo_loss, lambda p: dict(_policy_only(p), **_with_lengths(p)),
                               needs_reference=False),
    "pmle": PairwiseObjective(pmle_loss, _policy_only, needs_reference=False),
}


def get_pairwise_objective(name: str) -> PairwiseObjective:
    try:
        return PAIRWISE_OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown pairwise method {name!r}; valid: {sorted(PAIRWISE_OBJECTIVES)}") from None
