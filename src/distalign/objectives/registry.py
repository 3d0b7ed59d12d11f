"""Name -> objective, and how a trainer feeds it. Adding a method = one objective + one entry here.

The offline trainer computes a `PairLogps` for each batch and calls `objective(pair_logps, **hp)`;
hyperparameters come from the config's `loss:` mapping, typed by the function's own annotations and
defaults and checked against `valid`: each hyperparameter's range in interval notation ("(0, inf)")
or a tuple of its choices, so a typo names the valid keys and a value out of range fails at load.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor

from .cpo import cpo_loss
from .likelihood import reward_bt_loss, sft_loss
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
    """A pairwise loss, the tensors it takes from `PairLogps`, and whether it needs a reference model.

    `summary` is the one line `--list-fields` and errors show. `unused_with` maps a (hyperparameter, value)
    setting to the hyperparameters the loss ignores under it (e.g. cpo's `tau` with variant "clip"), so
    setting those is refused instead of silently doing nothing.
    """
    loss: Callable[..., Tensor]
    tensors: Callable[[PairLogps], dict]
    needs_reference: bool
    valid: Mapping[str, str | tuple] = field(default_factory=dict)   # hyperparameter -> range or choices
    summary: str = ""
    unused_with: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_valid(self.loss, self.valid)

    def hyperparameters(self) -> dict:
        """Keyword arguments with defaults that are not tensors taken from PairLogps."""
        return hyperparameters(self.loss)

    def validate(self, hparams: dict, where: str = "loss") -> None:
        valid = self.hyperparameters()
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            note = f" ({self.summary})" if self.summary else ""
            raise ValueError(f"{where}: unknown key(s) {unknown} for {self.loss.__name__}; valid: {sorted(valid)}"
                             f"{note}")
        settings = {**valid, **hparams}
        for (name, value), ignored in self.unused_with.items():
            given = sorted(k for k in set(ignored) & set(hparams) if hparams[k] != valid[k])  # set, not default
            if settings[name] == value and given:
                raise ValueError(f"{where}: {given} have no effect with {name}={value!r} in "
                                 f"{self.loss.__name__}; remove them or change {name}")

    def __call__(self, pair_logps: PairLogps, **hparams) -> Tensor:
        return self.loss(**self.tensors(pair_logps), **hparams)


def hyperparameters(fn: Callable) -> dict:
    """An objective's hyperparameters: its keyword arguments with defaults, name -> default."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_valid(fn: Callable, valid: Mapping) -> None:
    unknown = sorted(set(valid) - set(hyperparameters(fn)))
    if unknown:
        raise TypeError(f"{fn.__name__}: `valid` names {unknown}, which are not hyperparameters of it")


def _ref_and_lengths(p: PairLogps) -> dict:
    return dict(_with_ref(p), **_with_lengths(p))


BETA = {"beta": "(0, inf)"}
PAIRWISE_OBJECTIVES: dict[str, PairwiseObjective] = {
    "dpo": PairwiseObjective(dpo_loss, _with_ref, needs_reference=True, valid=BETA,
                             summary="DPO (Rafailov et al. 2023)"),
    "ipo": PairwiseObjective(ipo_loss, _ref_and_lengths, needs_reference=True, valid=BETA,
                             summary="IPO (Azar et al. 2023); per-token averaged log-ratios by default, as TRL"),
    "hinge": PairwiseObjective(hinge_loss, _with_ref, needs_reference=True, valid=BETA,
                               summary="SLiC-style hinge on the DPO margin"),
    "robust_dpo": PairwiseObjective(robust_dpo_loss, _with_ref, needs_reference=True,
                                    valid={**BETA, "epsilon": "[0, 0.5)",
                                           "variant": ("conservative", "robust")},
                                    summary="cDPO / rDPO under label noise epsilon"),
    "rpo": PairwiseObjective(rpo_loss, lambda p: dict(_with_ref(p), chosen_lengths=p.chosen_lengths),
                             needs_reference=True,
                             valid={**BETA, "alpha": "[0, inf)", "nll": ("batch", "example")},
                             summary="RPO: DPO + alpha * NLL of the chosen response (TRL's batch token mean "
                                     "by default)"),
    "cpo": PairwiseObjective(cpo_loss, _ref_and_lengths, needs_reference=True,
                             valid={**BETA, "alpha": "(0, inf)", "tau": "(0, inf)", "margin": "[0, inf)",
                                    "variant": ("full", "simple", "clip")},
                             summary="Constrained Preference Optimization (seed 003), not TRL's CPOTrainer, "
                                     "which is Contrastive Preference Optimization (Xu et al. 2024)",
                             unused_with={("variant", "simple"): ("alpha", "tau"),
                                          ("variant", "clip"): ("alpha", "tau", "margin")}),
    "simpo": PairwiseObjective(simpo_loss, lambda p: dict(_policy_only(p), **_with_lengths(p)),
                               needs_reference=False, valid={**BETA, "margin": "[0, inf)"},
                               summary="SimPO (Meng et al. 2024), reference-free"),
    "pmle": PairwiseObjective(pmle_loss, _policy_only, needs_reference=False, valid={"gamma": "(0, inf)"},
                              summary="preference MLE (seed 001 Eq. 5), reference-free; beta*KL on samples: "
                                      "pmle_online"),
}


@dataclass(frozen=True)
class SupervisedObjective:
    """SFT or reward-model loss as the offline trainer's tasks call it (`training.tasks`)."""
    loss: Callable[..., Tensor]
    valid: Mapping[str, str | tuple] = field(default_factory=dict)

    def __post_init__(self):
        _check_valid(self.loss, self.valid)


SUPERVISED_OBJECTIVES: dict[str, SupervisedObjective] = {
    "sft": SupervisedObjective(sft_loss),
    "reward": SupervisedObjective(reward_bt_loss, valid={"margin": "[0, inf)", "l2": "[0, inf)",
                                                         "center_rewards_coefficient": "[0, inf)"}),
}


def offline_objective(method: str) -> tuple[Callable, Mapping[str, str | tuple]] | None:
    """(loss function, valid ranges / choices of its hyperparameters) of an offline method, else None."""
    entry = PAIRWISE_OBJECTIVES.get(method) or SUPERVISED_OBJECTIVES.get(method)
    return (entry.loss, entry.valid) if entry is not None else None


def get_pairwise_objective(name: str) -> PairwiseObjective:
    try:
        return PAIRWISE_OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown pairwise method {name!r}; valid: {sorted(PAIRWISE_OBJECTIVES)}") from None
