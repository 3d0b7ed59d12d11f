"""Iterative learning from demonstrations (and preference pairs): SPIN, SPAC and RPO with a
demonstrations data set (tutorial seed 002 §IV-A2 Eq. 12, §V-B; SPEC §2 "Online").

    distalign train spin --config configs/spin.yaml
    train_iterative(load_config(OnlinePairwiseConfig, "configs/spac.yaml"))

Each of `iteration.iterations` rounds samples one response y' per demonstration prompt from the current
policy pi_t, then makes `iteration.steps_per_iteration` optimizer steps on batches of
(demonstration y, own sample y') (and of preference pairs):
- spin: `spin_loss`, DPO of y > y' with pi_t (a frozen copy taken at the start of the round) as reference;
- spac: `spac_loss`, DPO of y > y' plus alpha * DPO on the pairs, both against the fixed reference pi0;
- rpo_demos: `rpo_demos_loss`, per-token NLL of demonstrations plus alpha * DPO on the pairs (no sampling).
Sequence log-probs are taken at temperature 1 for demonstrations and samples alike.

`train.max_steps` (if > 0) sets the number of optimizer steps instead of `iteration.iterations`, the
last round then possibly shorter. A checkpoint inside a round also holds the round's samples and, for
SPIN, the round's reference pi_t, so a resumed run repeats the uninterrupted one bit for bit.
"""
from __future__ import annotations

import copy

import torch

from distalign.config.online_pairwise import OnlinePairwiseConfig, uses_reference
from distalign.models import collate_pairs, collate_sequences, pair_logps, sequence_logps
from distalign.objectives.online_pairwise import rpo_demos_loss, spac_loss, spin_loss

from .checkpoint import load_trainable, trainable_state_dict
from .common import require_single_process
from .metrics_log import LogWindow
from .online_pairwise import PolicySession


class IterativeTrainer(PolicySession):
    def __init__(self, cfg: OnlinePairwiseConfig, log=print):
        require_single_process(cfg.method)
        super().__init__(cfg, needs_reference=uses_reference(cfg), log=log)
        self.demos = self.load(cfg.demonstrations, "demonstrations")
        self.pairs = self.load(cfg.pairs, "pairs") if cfg.method in ("spac", "rpo_demos") else None
        it = cfg.iteration
        data = {"demonstrations": self.demos, **({"pairs": self.pairs} if self.pairs is not None else {})}
        self.start_schedule(cfg.train.max_steps or it.iterations * it.steps_per_iteration, 1, data,
                            {"iteration": {"steps_per_iteration": it.steps_per_iteration}})

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def sequence_logps(self, model, prompts: list, responses: list) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.to_device(collate_sequences(prompts, responses, self.pad))
        logps, _, lengths = sequence_logps(model, batch)
        return logps, lengths.float()

    @torch.no_grad()
    def own_samples(self) -> list[list[int]]:
        """One sample of the current policy per demonstration prompt, as token lists ending at EOS."""
        samples = []
        for start in range(0, len(self.demos), 256):
            batch = self.sample([d.prompt_ids for d in self.demos[start:start + 256]], 1)
            lengths = batch.response_mask.sum(-1).long().tolist()
            samples += [ids[:n] for ids, n in zip(batch.response_ids.tolist(), lengths)]
        return samples

    def frozen_logps(self, model, prompts, responses):
        with torch.no_grad():
            return self.sequence_logps(model, prompts, responses)[0]

    def pair_terms(self, step: int):
        records = self.batch_of(self.pairs, step)
        batch = self.to_device(collate_pairs(records, self.pad))
        out = pair_logps(self.policy, batch)
        with self.reference.context() as ref_model, torch.no_grad():
            ref = pair_logps(ref_model, batch)
        return out.chosen_logps, out.rejected_logps, ref.chosen_logps, ref.rejected_logps

    def step_loss(self, step: int, samples, previous) -> torch.Tensor:
        hp, index = self.cfg.loss, self.batch_of(list(range(len(self.demos))), step)
        prompts = [self.demos[i].prompt_ids for i in index]
        demos = [self.demos[i].completion_ids for i in index]
        if self.cfg.method == "rpo_demos":
            demo_logps, lengths = self.sequence_logps(self.policy, prompts, demos)
            return rpo_demos_loss(demo_logps, lengths, *self.pair_terms(step), hp.beta, hp.alpha)
        own = [samples[i] for i in index]
        logps, _ = self.sequence_logps(self.policy, prompts + prompts, demos + own)
        demo_logps, own_logps = logps.chunk(2)
        if self.cfg.method == "spin":
            prev_demo, prev_own = self.frozen_logps(previous, prompts + prompts, demos + own).chunk(2)
            return spin_loss(demo_logps, own_logps, prev_demo, prev_own, hp.beta).mean()
        with self.reference.context() as ref_model:
            ref_demo, ref_own = self.frozen_logps(ref_model, prompts + prompts, demos + own).chunk(2)
        return spac_loss(demo_logps, own_logps, ref_demo, ref_own, *self.pair_terms(step), hp.beta, hp.alpha)

    def start_round(self):
        """A round's own samples y' ~ pi_t and (spin) the frozen pi_t it is measured against."""
        samples = self.own_samples() if self.cfg.method != "rpo_demos" else None
        previous = copy.deepcopy(self.policy).eval().requires_grad_(False) if self.cfg.method == "spin" else None
        return samples, previous

    def round_state(self, step: int, samples, previous) -> dict:
        """What a checkpoint inside a round must hold besides the policy: the samples and pi_t."""
        if step % self.cfg.iteration.steps_per_iteration == 0:
            return {}  # the next round draws its own
        state = {}
        if samples is not None:
            state["samples"] = torch.tensor([t for s in samples for t in s], dtype=torch.long)
            state["sample_lengths"] = torch.tensor([len(s) for s in samples], dtype=torch.long)
        if previous is not None:
            state["previous"] = trainable_state_dict(previous)
        return state

    def restore_round(self, state: dict):
        samples = previous = None
        if "samples" in state:
            samples = [s.tolist() for s in state["samples"].split(state["sample_lengths"].tolist())]
        if "previous" in state:
            previous = copy.deepcopy(self.policy).eval().requires_grad_(False)
            load_trainable(previous, state["previous"])
        return samples, previous

    def train(self) -> dict:
        per_round = self.cfg.iteration.steps_per_iteration
        save_every = self.cfg.train.save_every
        state, logger = self.begin()
        step, history = state["step"], []
        window = LogWindow(self.cfg.train.log_every, self.total_steps)
        samples, previous = self.restore_round(state)
        try:
            while step < self.total_steps:
                iteration = step // per_round
                if step % per_round == 0:
                    samples, previous = self.start_round()
                self.policy.train()
                with self.acc.autocast():
                    loss = self.step_loss(step, samples, previous)
                metrics = self.optimizer_step(loss, step)
                step += 1
                values = {f"train/{k}": float(v) for k, v in metrics.items()}
                values["train/iteration"] = iteration
                if (line := window.add(step, values)) is not None:
                    logger.log(step, line)
                logger.advance()
                history.append({"step": step, **values})
                if save_every and step % save_every == 0 and step < self.total_steps:
                    self.save(step, self.round_state(step, samples, previous))
        finally:
            logger.close()
        # A run that ends inside a round may be resumed with more steps (train.resume_allow=[max_steps]):
        # its last checkpoint holds the round's samples and pi_t like any other.
        return self.finish(history, self.round_state(step, samples, previous))


def train_iterative(config: OnlinePairwiseConfig, log=print) -> dict:
    """spin, spac or rpo_demos from a validated config; returns paths, the per-step history and final metrics."""
    return IterativeTrainer(config, log=log).train()
