"""What the offline loop trains: a task turns tokenized records into a batch and a batch into
per-example losses and metrics. SFT and reward modelling are tasks; every pairwise objective of the
registry is served by `PairwiseTask`, so a new pairwise method never touches this file."""
from __future__ import annotations

from torch import Tensor

from distalign.models import ReferenceModel, score_sequences
from distalign.models.collate import collate_pairs, collate_sequences
from distalign.models.logprobs import pair_logps, sequence_logps
from distalign.objectives import (
    PairLogps,
    frac_in_undesirable,
    get_pairwise_objective,
    length_normalised_delta,
    reward_bt_loss,
    sft_loss,
)
from distalign.objectives.registry import hyperparameters


class SFTTask:
    """Masked NLL of demonstrations (SPEC §2): mean over response tokens, then over the batch."""
    data_kind = "demonstrations"
    needs_reference = False

    def __init__(self, pad_token_id: int, loss_kwargs: dict):
        if loss_kwargs:
            raise ValueError(f"loss: method 'sft' takes no hyperparameters, got {sorted(loss_kwargs)}")
        self.pad_token_id = pad_token_id

    def collate(self, records) -> dict:
        return collate_sequences([r.prompt_ids for r in records], [r.completion_ids for r in records],
                                 self.pad_token_id)

    def loss(self, model, batch, reference=None) -> tuple[Tensor, dict]:
        _, token_logps, lengths = sequence_logps(model, batch)
        losses = sft_loss(token_logps, batch["response_mask"])
        return losses, {"nll": losses.detach(), "response_tokens": lengths.detach().float()}


class RewardTask:
    """Bradley-Terry reward model (seed 001 Eq. 9) on [prompt|chosen] and [prompt|rejected] rows."""
    data_kind = "pairs"
    needs_reference = False

    def __init__(self, pad_token_id: int, loss_kwargs: dict):
        allowed = set(hyperparameters(reward_bt_loss))
        unknown = sorted(set(loss_kwargs) - allowed)
        if unknown:
            raise ValueError(f"loss: unknown key(s) {unknown} for reward_bt_loss; valid: {sorted(allowed)}")
        self.pad_token_id, self.kwargs = pad_token_id, loss_kwargs

    def collate(self, records) -> dict:
        prompts = [r.prompt_ids for r in records] * 2
        responses = [r.chosen_ids for r in records] + [r.rejected_ids for r in records]
        return collate_sequences(prompts, responses, self.pad_token_id)

    def loss(self, model, batch, reference=None) -> tuple[Tensor, dict]:
        scores = score_sequences(model, batch)
        chosen, rejected = scores.chunk(2)
        losses = reward_bt_loss(chosen, rejected, **self.kwargs)
        return losses, {"accuracy": (chosen > rejected).float().detach(),
                        "margin": (chosen - rejected).detach(), "reward_chosen": chosen.detach()}


class PairwiseTask:
    """Any objective in `objectives.PAIRWISE_OBJECTIVES`; chosen and rejected in one forward.

    Reference log-probs come from the batch when the trainer precomputed them (`precompute_reference`),
    else from a reference forward if the objective needs one. Reference-free objectives (pmle, simpo)
    then still get the reference-based diagnostics of `pair_metrics`.
    """
    data_kind = "pairs"

    def __init__(self, method: str, pad_token_id: int, loss_kwargs: dict, share_prompt: bool = True):
        self.objective = get_pairwise_objective(method)
        self.objective.validate(loss_kwargs)
        self.needs_reference = self.objective.needs_reference
        self.pad_token_id, self.kwargs, self.share_prompt = pad_token_id, loss_kwargs, share_prompt
        settings = {**self.objective.hyperparameters(), **loss_kwargs}
        self.reward_scale = settings.get("beta", settings.get("gamma", 1.0))

    def collate(self, records) -> dict:
        return collate_pairs(records, self.pad_token_id, share_prompt=self.share_prompt)

    def reference_logps(self, batch: dict, reference: ReferenceModel) -> tuple[Tensor, Tensor]:
        with reference.context() as module:
            out = pair_logps(module, batch)
        return out.chosen_logps, out.rejected_logps

    def loss(self, model, batch, reference: ReferenceModel | None = None) -> tuple[Tensor, dict]:
        ref_chosen = ref_rejected = None
        if "ref_chosen_logps" in batch:  # precomputed once for the whole dataset
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif self.needs_reference:  # before the policy: its transient memory never adds to the policy's activations
            ref_chosen, ref_rejected = self.reference_logps(batch, reference)
        out = pair_logps(model, batch)
        logps = PairLogps(out.chosen_logps, out.rejected_logps, out.chosen_lengths.float(),
                          out.rejected_lengths.float(), ref_chosen, ref_rejected)
        losses = self.objective(logps, **self.kwargs)
        return losses, pair_metrics(logps, self.reward_scale)


def pair_metrics(p: PairLogps, reward_scale: float = 1.0) -> dict:
    """Per-example diagnostics logged for every pairwise method (batch means are taken by the loop).

    Always: accuracy (the policy prefers chosen), delta_policy = s+ - s-, logps_chosen / _rejected.
    With reference log-probs: margin = (s+ - r+) - (s- - r-); frac_in_undesirable, the share of pairs in
    CPO's U on CPO's own length-normalised deltas; and TRL's DPOTrainer metrics rewards/chosen =
    beta (s+ - r+), rewards/rejected = beta (s- - r-), rewards/margins (their difference) and
    rewards/accuracies (chosen's implicit reward is higher), beta = `reward_scale` (the objective's beta;
    pmle: gamma).
    """
    delta_policy = (p.policy_chosen - p.policy_rejected).detach()
    metrics = {"accuracy": (delta_policy > 0).float(), "delta_policy": delta_policy,
               "logps_chosen": p.policy_chosen.detach(), "logps_rejected": p.policy_rejected.detach()}
    if p.ref_chosen is not None:
        delta_ref = (p.ref_chosen - p.ref_rejected).detach()
        metrics["margin"] = delta_policy - delta_ref
        normalised_policy = length_normalised_delta(p.policy_chosen, p.policy_rejected, p.chosen_lengths,
                                                    p.rejected_lengths).detach()
        normalised_ref = length_normalised_delta(p.ref_chosen, p.ref_rejected, p.chosen_lengths,
                                                 p.rejected_lengths).detach()
        metrics["frac_in_undesirable"] = frac_in_undesirable(normalised_policy, normalised_ref).expand_as(delta_policy)
        chosen = reward_scale * (p.policy_chosen - p.ref_chosen).detach()
        rejected = reward_scale * (p.policy_rejected - p.ref_rejected).detach()
        metrics.update({"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                        "rewards/accuracies": (chosen > rejected).float()})
    return metrics


def build_task(method: str, pad_token_id: int, loss_kwargs: dict, share_prompt: bool = True):
    if method == "sft":
        return SFTTask(pad_token_id, loss_kwargs)
    if method == "reward":
        return RewardTask(pad_token_id, loss_kwargs)
    return PairwiseTask(method, pad_token_id, loss_kwargs, share_prompt)
