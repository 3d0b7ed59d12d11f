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
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from distalign.config.online_pairwise import OnlinePairwiseConfig, uses_reference
from distalign.models import collate_pairs, collate_sequences, pair_logps, save_model, sequence_logps
from distalign.objectives.online_pairwise import rpo_demos_loss, spac_loss, spin_loss

from .checkpoint import begin_run
from .common import LogWindow, MetricsLogger, require_single_process
from .online_pairwise import PolicySession


class IterativeTrainer(PolicySession):
    def __init__(self, cfg: OnlinePairwiseConfig, log=print):
        require_single_process(cfg.method)
        it = cfg.iteration
        self.total_steps = it.iterations * it.steps_per_iteration
        super().__init__(cfg, self.total_steps, needs_reference=uses_reference(cfg), log=log)
        self.demos = self.load(cfg.demonstrations, "demonstrations")
        self.pairs = self.load(cfg.pairs, "pairs") if cfg.method in ("spac", "rpo_demos") else None

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

    def train(self) -> dict:
        t, it = self.cfg.train, self.cfg.iteration
        out = Path(t.output_dir)
        begin_run(self.cfg, out)
        logger = MetricsLogger(out, True, self.total_steps, 0, t.progress_bar, self.cfg.method)
        window, history, step = LogWindow(t.log_every, self.total_steps), [], 0
        try:
            for iteration in range(it.iterations):
                samples = self.own_samples() if self.cfg.method != "rpo_demos" else None
                previous = copy.deepcopy(self.policy).eval().requires_grad_(False) \
                    if self.cfg.method == "spin" else None
                for _ in range(it.steps_per_iteration):
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
        finally:
            logger.close()
        final = save_model(self.policy, self.tokenizer, out / "final")
        return {"output_dir": str(out), "final_model": str(final), "steps": self.total_steps,
                "history": history, "metrics": history[-1] if history else {}}


def train_iterative(config: OnlinePairwiseConfig, log=print) -> dict:
    """spin, spac or rpo_demos from a validated config; returns paths, the per-step history and final metrics."""
    return IterativeTrainer(config, log=log).train()
