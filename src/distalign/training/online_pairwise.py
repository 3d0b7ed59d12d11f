"""Online pairwise loop: sample two (or more) responses per prompt from the current policy, label or
score them, update with a pairwise objective (SPEC §2 "Online"; seed 001 Eq. 5, 10, Algorithm 1).

    distalign train rebel --config configs/rebel.yaml train.max_steps=50
    train_online_pairwise(load_config(OnlinePairwiseConfig, "configs/online_distill.yaml"))

Methods (consecutive samples 2i, 2i+1 of a prompt form the pair (a, b)):
- online_dpo: a > b by the reward sources (ties dropped) or a judge's P(a > b) >= 1/2; `dpo_loss` with pi0.
- online_distill (seed 001 Algorithm 1): BCE of sigma(gamma (log pi(a) - log pi(b))) toward the soft label
  sigma(R(a) - R(b)), plus kl_coef * KL(pi||pi0) by the score-function estimator on the same fresh samples.
- rebel (seed 001 Eq. 10): squared regression onto eta (R'(a) - R'(b)) with R' = R - kl_coef log pi_t/pi0
  (the KL penalty folded into the reward), pi_t = the generating policy, `update_epochs` passes.
- pmle_online (seed 001 Eq. 5): `pmle_loss` on a batch of DATASET pairs plus kl_coef * KL(pi||pi0) on
  `num_samples` fresh samples at each pair's prompt, again by the score-function estimator (the gradient
  of a sampled k1 value is wrong; see `objectives.score_function_kl`).
- nash_md_pg (Munos et al. 2024 Sec. 7): each of the `num_samples` samples y ~ pi of a prompt meets its own
  opponent y' ~ pi_mix ∝ pi^(1-mixture) pi0^mixture (token-level, `MixtureSampler`); P(y > y') from a judge
  or sigma(R(y) - R(y')); policy gradient (P - 1/2) grad log pi(y) plus kl_coef * KL(pi||pi0) as above
  (`nash_md_pg_loss`). The tabular, exact Nash-MD is `training.nash`.
Log-probs of samples are taken at the sampling temperature, so they are the sampler's own. Prompt order
and the sampler's draws come from (seed, step) (`online.process_uniforms`), so a resumed run repeats the
uninterrupted one on CPU. Under `torchrun` / `accelerate launch` each process takes its contiguous share
of every global batch and of those draws, and gradients are averaged over processes after the backward
(`common.average_gradients`: several forwards feed one backward here, which DDP's hooks do not allow);
N processes with `train.batch_size` b match one process with N b where the loss is a mean over pairs
(test). `PolicySession` is shared with `iterative.py`, which stays single-process.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from distalign.config import to_dict
from distalign.config.online_pairwise import OnlinePairwiseConfig, uses_reference
from distalign.models import collate_pairs, load_policy, pair_logps
from distalign.objectives import distill_loss, dpo_loss, pmle_loss, score_function_kl
from distalign.objectives.online_pairwise import nash_md_pg_loss, orient_pairs, rebel_loss
from distalign.rewards import CallableJudge, build_reward

from .checkpoint import begin_run, run_identity, save_checkpoint_on_main
from .common import (
    StepGuard,
    average_gradients,
    build_optimizer,
    build_reference,
    build_scheduler,
    log_trainable_parameters,
    make_accelerator,
    mean_over_processes,
    process_sum,
    sampling_settings,
    save_final,
    set_seed,
)
from .metrics_log import LogWindow, MetricsLogger
from .online import (OPPONENT_SAMPLING, SAMPLING, kl_metrics, process_uniforms, prompt_order, reward_parts,
                     score_samples)
from .rollout import SampledBatch, response_forward
from .run_data import load_records, load_run_tokenizer
from .sampling import MixtureSampler, build_sampler, sampler_options


class PolicySession:
    """What every loop here holds: tokenizer, policy, reference, optimizer, sampler and the data files;
    `start_schedule` (once the data fixes the step count) adds the schedule, the guarded optimizer step
    and the run identity, and `begin` / `save` / `finish` the run folder's checkpoints and final model."""

    def __init__(self, cfg: OnlinePairwiseConfig, needs_reference: bool, log=print):
        self.cfg, self.log = cfg, log
        self.acc = make_accelerator(cfg.train.mixed_precision, cfg.train.retain_freed_memory, what=cfg.method)
        self.device = self.acc.device
        self.sum_processes = process_sum(self.acc)  # means over pairs span all processes
        set_seed(cfg.train.seed)
        m = cfg.model
        self.tokenizer = load_run_tokenizer(m, cfg.data)
        self.pad = self.tokenizer.pad_token_id
        lora = to_dict(m.lora) if m.lora is not None else None
        self.policy = load_policy(m.name_or_path, **m.load_options(), lora=lora, device=self.device,
                                  gradient_checkpointing=cfg.train.gradient_checkpointing)
        if self.acc.is_main_process:
            log_trainable_parameters(self.policy, log)
        self.reference = build_reference(self.policy, cfg.model, cfg.reference, self.device) if needs_reference else None
        self.optimizer = self.acc.prepare(build_optimizer(self.policy, cfg.optim))  # fp16 loss scaling
        self.sampler = build_sampler(self.tokenizer, cfg.generation, m.name_or_path)

    def start_schedule(self, total_steps: int, updates_per_step: int, data: dict, objective: dict) -> None:
        """The learning-rate schedule over `total_steps` x `updates_per_step` updates, the guarded optimizer
        step and the run identity (taken now, from the initial weights)."""
        cfg = self.cfg
        self.total_steps = total_steps
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps * updates_per_step)
        self.guard = StepGuard(self.policy.parameters(), self.optimizer, self.scheduler, cfg.optim.max_grad_norm,
                               self.acc, cfg.train.on_nonfinite, self.log)
        objective = {"loss": to_dict(cfg.loss), "rewards": [to_dict(r) for r in cfg.rewards], "judge": cfg.judge,
                     "generation": sampling_settings(cfg.generation), "update_epochs": cfg.update_epochs, **objective}
        self.identity = run_identity(cfg, self.policy, data=data, global_batch=self.global_batch(),
                                     total_steps=total_steps, objective=objective)

    def load(self, path: str, kind: str) -> list:
        return load_records(self.cfg.data, path, kind, self.tokenizer, self.log)

    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.acc.num_processes

    def batch_of(self, records: list, step: int) -> list:
        """This process's share of the step-th global batch of a fixed-seed permutation per epoch (as
        Online engine I's loop)."""
        bs, global_batch = self.cfg.train.batch_size, self.global_batch()
        per_epoch = len(records) // global_batch
        if per_epoch == 0:
            raise ValueError(f"train.batch_size={bs} x {self.acc.num_processes} process(es) exceeds the "
                             f"{len(records)} records of a data file")
        epoch, in_epoch = divmod(step, per_epoch)
        start = in_epoch * global_batch + self.acc.process_index * bs
        order = prompt_order(len(records), self.cfg.train.seed, epoch)[start:start + bs]
        return [records[i] for i in order.tolist()]

    def sample(self, prompt_ids: list, k: int, step: int | None = None, stream: int = SAMPLING,
               sampler=None) -> SampledBatch:
        """k samples per prompt; with `step`, drawn from that step's `stream` (else torch's global RNG)."""
        rows = [p for p in prompt_ids for _ in range(k)]
        uniforms = None if step is None else process_uniforms(
            self.cfg.train.seed, step, stream, len(rows), self.cfg.generation.max_new_tokens, self.acc)
        return (sampler or self.sampler).sample(self.policy, rows, uniforms)

    def token_logps(self, batch: SampledBatch, model=None):
        """Response token log-probs (B, T) at the sampling temperature; no grad unless model is None."""
        with self.acc.autocast(), torch.set_grad_enabled(model is None and torch.is_grad_enabled()):
            return response_forward(model or self.policy, batch, self.cfg.generation.temperature).token_logps

    def logps(self, batch: SampledBatch, model=None):
        """Summed response log-probs (B,) at the sampling temperature; no grad unless model is None."""
        return self.token_logps(batch, model).sum(-1)

    @torch.no_grad()
    def ref_token_logps(self, batch: SampledBatch):
        with self.reference.context() as ref_model:
            return self.token_logps(batch, ref_model)

    def save(self, step: int, trainer_state: dict | None = None) -> None:
        save_checkpoint_on_main(self.acc, self.cfg.train.output_dir, step, self.policy, self.optimizer,
                                self.scheduler, {"step": step, **(trainer_state or {})},
                                keep=self.cfg.train.keep_checkpoints, identity=self.identity)

    def begin(self) -> tuple[dict, MetricsLogger]:
        """`begin_run` on this run's folder (restoring a checkpoint on resume) and its metrics logger."""
        t = self.cfg.train
        main = self.acc.is_main_process
        state = begin_run(self.cfg, t.output_dir, run=t, identity=self.identity, model=self.policy,
                          optimizer=self.optimizer, scheduler=self.scheduler, log=self.log, main_process=main,
                          barrier=self.acc.wait_for_everyone)
        logger = MetricsLogger(t.output_dir, main, self.total_steps, state["step"], t.progress_bar, self.cfg.method,
                               t.report_to, to_dict(self.cfg))
        return state, logger

    def finish(self, history: list, trainer_state: dict | None = None) -> dict:
        """The last checkpoint (with `trainer_state`) and final/ (main process); the result every loop here
        returns."""
        self.save(self.total_steps, trainer_state)
        out = Path(self.cfg.train.output_dir)
        if self.acc.is_main_process:
            save_final(self.policy, self.tokenizer, out, self.cfg.train, optimizer=self.optimizer)
        self.acc.wait_for_everyone()
        return {"output_dir": str(out), "final_model": str(out / "final"), "steps": self.total_steps,
                "history": history, "metrics": history[-1] if history else {}}

    def optimizer_step(self, loss: torch.Tensor, step: int) -> dict:
        self.acc.backward(loss)
        average_gradients(self.policy, self.acc)
        return {"loss": loss.detach(), "grad_norm": self.guard.step(loss, step + 1)}


class OnlinePairwiseTrainer(PolicySession):
    def __init__(self, cfg: OnlinePairwiseConfig, log=print):
        self.method, self.k = cfg.method, cfg.generation.num_samples
        mixture = cfg.loss.mixture if cfg.method == "nash_md_pg" else 0.0
        super().__init__(cfg, uses_reference(cfg), log)
        # Nash-MD-PG's opponent; with mixture 0 it is the policy itself (self-play), drawn by `sampler`.
        self.opponent_sampler = self.sampler
        if mixture > 0:
            self.opponent_sampler = MixtureSampler(self.tokenizer, mixture, self.reference.context,
                                                   fast_decode=cfg.generation.fast_decode,
                                                   **sampler_options(cfg.generation))
        kind, path = ("pairs", cfg.pairs) if cfg.method == "pmle_online" else ("prompts", cfg.data.train)
        self.records = self.load(path, kind)
        t = cfg.train
        self.start_schedule(t.max_steps or max(1, math.floor(t.epochs * (len(self.records) // self.global_batch()))),
                            cfg.update_epochs, {"train": self.records}, {})
        self.reward = build_reward(cfg.rewards, self.device, cfg.model.trust_remote_code) if cfg.rewards else None
        self.judge = CallableJudge(cfg.judge) if cfg.judge else None

    def score(self, records: list, batch: SampledBatch) -> tuple[torch.Tensor | None, list[str], list[str]]:
        """(rewards with `generation.missing_eos_penalty`, or None with only a judge; prompts; completions)."""
        return score_samples(self.reward, self.tokenizer, records, batch, self.k,
                             self.cfg.generation.missing_eos_penalty, self.device)

    def judged(self, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
        """The judge's P(a > b) per pair (B,)."""
        return self.judge(prompts, a, b).to(self.device)

    def labels(self, scores, prompts, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """online_dpo: (a_wins, keep) per pair; reward ties carry no label and are dropped."""
        if self.judge is not None:
            p = self.judged(prompts[0::2], texts[0::2], texts[1::2])
            return p >= 0.5, torch.ones_like(p, dtype=torch.bool)
        return scores[0::2] > scores[1::2], scores[0::2] != scores[1::2]

    def train_step(self, step: int) -> dict:
        if self.method == "pmle_online":
            return self.pmle_step(step)
        if self.method == "nash_md_pg":
            return self.nash_step(step)
        records = self.batch_of(self.records, step)
        batch = self.sample([r.prompt_ids for r in records], self.k, step)
        scores, prompts, texts = self.score(records, batch)
        old_tokens = self.token_logps(batch, self.policy)
        old, ref = old_tokens.sum(-1), None
        metrics = {"response_length": batch.response_mask.sum(-1).float().mean(),
                   "truncated_fraction": batch.truncated.float().mean()}
        if self.reference is not None:
            ref_tokens = self.ref_token_logps(batch)
            ref = ref_tokens.sum(-1)
            metrics.update(kl_metrics(old_tokens, ref_tokens, batch.response_mask))
        if scores is not None:
            metrics.update(reward_mean=scores.mean(), **reward_parts(self.reward))
        if self.method == "rebel" and ref is not None:
            scores = scores - self.cfg.loss.kl_coef * (old - ref)
        for _ in range(self.cfg.update_epochs):
            logps = self.logps(batch)
            loss, extra = self.pair_loss(logps, old, ref, scores, prompts, texts)
            metrics.update(extra)
            metrics.update(self.optimizer_step(loss, step))
        return metrics

    def pair_loss(self, logps, old, ref, scores, prompts, texts) -> tuple[torch.Tensor, dict]:
        a, b = logps[0::2], logps[1::2]
        hp = self.cfg.loss
        if self.method == "online_dpo":
            a_wins, keep = self.labels(scores, prompts, texts)
            chosen, rejected = orient_pairs(a, b, a_wins)
            ref_chosen, ref_rejected = orient_pairs(ref[0::2], ref[1::2], a_wins)
            losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, hp.beta)
            # The mean over every process's labelled pairs: gradients are averaged over processes next.
            kept = self.sum_processes(keep.sum())
            loss = float(self.acc.num_processes) * (losses * keep).sum() / kept.clamp(min=1)
            return loss, {"labelled_fraction": keep.float().mean(), "preference_loss": loss.detach()}
        if self.method == "rebel":
            loss = rebel_loss(a, b, old[0::2], old[1::2], scores[0::2], scores[1::2], hp.eta).mean()
            return loss, {"preference_loss": loss.detach()}
        preference = distill_loss(a, b, scores[0::2], scores[1::2], hp.gamma).mean()
        return preference + self.kl_term(logps, ref), {"preference_loss": preference.detach()}

    def kl_term(self, logps, ref) -> torch.Tensor:
        """kl_coef * grad-estimator of KL(pi||pi0): `score_function_kl` with a leave-one-out baseline."""
        if ref is None:
            return logps.sum() * 0
        return self.cfg.loss.kl_coef * score_function_kl(logps, ref, self.k).mean()

    def pmle_step(self, step: int) -> dict:
        records = self.batch_of(self.records, step)
        with self.acc.autocast():
            out = pair_logps(self.policy, {k: v.to(self.device) if torch.is_tensor(v) else v
                                           for k, v in collate_pairs(records, self.pad).items()})
        preference = pmle_loss(out.chosen_logps, out.rejected_logps, self.cfg.loss.gamma).mean()
        metrics = {"preference_loss": preference.detach(),
                   "accuracy": (out.chosen_logps > out.rejected_logps).float().mean()}
        loss = preference
        if self.reference is not None:
            batch = self.sample([r.prompt_ids for r in records], self.k, step)
            tokens, ref_tokens = self.token_logps(batch), self.ref_token_logps(batch)
            loss = loss + self.kl_term(tokens.sum(-1), ref_tokens.sum(-1))
            metrics.update(kl_metrics(tokens.detach(), ref_tokens, batch.response_mask))
        metrics.update(self.optimizer_step(loss, step))
        return metrics

    def nash_step(self, step: int) -> dict:
        """One on-policy Nash-MD-PG update; y and y' are two separate samplers' draws at the same prompts."""
        records = self.batch_of(self.records, step)
        prompt_ids = [r.prompt_ids for r in records]
        batch = self.sample(prompt_ids, self.k, step)
        opponents = self.sample(prompt_ids, self.k, step, OPPONENT_SAMPLING, self.opponent_sampler)
        scores, prompts, texts = self.score(records, batch)
        parts = reward_parts(self.reward)
        opponent_scores, _, opponent_texts = self.score(records, opponents)
        pref = (self.judged(prompts, texts, opponent_texts) if self.judge is not None
                else torch.sigmoid(scores - opponent_scores))
        tokens = self.token_logps(batch)
        ref_tokens = self.ref_token_logps(batch) if self.cfg.loss.kl_coef > 0 else None
        ref = ref_tokens.sum(-1) if ref_tokens is not None else None
        loss = nash_md_pg_loss(tokens.sum(-1), ref, pref, self.cfg.loss.kl_coef, self.k).mean()
        metrics = {"preference_vs_opponent": pref.mean(), "truncated_fraction": batch.truncated.float().mean(),
                   "response_length": batch.response_mask.sum(-1).float().mean()}
        if ref_tokens is not None:
            metrics.update(kl_metrics(tokens.detach(), ref_tokens, batch.response_mask))
        if scores is not None:
            metrics.update(reward_mean=scores.mean(), **parts)
        metrics.update(self.optimizer_step(loss, step))
        return metrics

    def train(self) -> dict:
        t = self.cfg.train
        state, logger = self.begin()
        window, history = LogWindow(t.log_every, self.total_steps), []
        try:
            for step in range(state["step"], self.total_steps):
                self.policy.train()
                metrics = {f"train/{k}": v for k, v in mean_over_processes(self.train_step(step), self.acc).items()}
                if (line := window.add(step + 1, metrics)) is not None:
                    logger.log(step + 1, line)
                logger.advance()
                history.append({"step": step + 1, **metrics})
                if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < self.total_steps:
                    self.save(step + 1)
        finally:
            logger.close()
        return self.finish(history)


def train_online_pairwise(config: OnlinePairwiseConfig, log=print) -> dict:
    """online_dpo, online_distill, rebel, pmle_online or nash_md_pg from a validated config; paths, history,
    metrics."""
    return OnlinePairwiseTrainer(config, log=log).train()
