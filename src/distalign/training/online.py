"""The online loop: generate -> score -> several epochs of minibatch updates (PPO, REINFORCE, RLOO,
GRPO, reverse KL; SPEC §2 "Online").

    distalign train grpo --config configs/grpo.yaml train.max_steps=50
    train_online(load_config(OnlineConfig, "configs/grpo.yaml"))

One step = one rollout of `train.batch_size` prompts x `generation.num_samples` completions. The
sampler keeps its own log-probs and entropies; only PPO (values) or a sampler that keeps none needs a
no-grad forward of the policy. One forward of the reference gives pi0's log-probs; the registry's
objective turns them into advantages once, then each of `update_epochs` passes makes
`num_minibatches` optimizer steps over shuffled groups (a prompt's k samples stay together, so every
forward encodes each prompt once: `share_prompt`). The method only enters through its
`OnlineObjective` entry.

Randomness is a function of the run's seed and the step only: prompt order is a permutation drawn from
(seed, epoch), and each step draws the sampler's uniforms for the whole global batch and the minibatch
order from generators seeded with (seed, step). So a resumed run repeats the uninterrupted one bit for
bit on CPU, and under `torchrun` / `accelerate launch` (DDP through accelerate) each process takes its
contiguous share of the step's prompts and of those draws: N processes with `train.batch_size` b sample
the same completions as one process with N b, and, where the loss is a mean over rows (GRPO, RLOO,
REINFORCE, reverse KL by default), take the same optimizer steps (test). PPO's token-mean loss and its
advantage whitening use each process's own rows, as TRL's do.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from distalign.config import to_dict
from distalign.config.online import OnlineConfig
from distalign.models import is_peft_model, load_policy
from distalign.objectives.kl import sequence_kl_estimate
from distalign.objectives.online_registry import RolloutTensors, get_online_objective
from distalign.objectives.policy_gradient import masked_mean
from distalign.rewards import build_reward

from .checkpoint import begin_run, run_identity, save_checkpoint_on_main
from .common import (
    StepGuard,
    bf16_linear_weights,
    bf16_training_weights,
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
from .rollout import ResponseForward, SampledBatch, completion_texts, grouped_response_forward
from .run_data import load_records, load_run_tokenizer
from .sampling import build_sampler
from .value_head import PolicyWithValueHead, build_value_head

ADVANTAGE_KEYS = ("kl_coef", "entropy_coef", "gamma", "lam", "whiten_advantages", "scale_rewards")


def prompt_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


SAMPLING, MINIBATCH_ORDER, OPPONENT_SAMPLING = 1, 2, 3  # the draws a step makes, each from its own generator


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator for one kind of draw (`stream`) at one step: the same on every process.

    Its seed is hashed from (seed, step, stream) by numpy's SeedSequence, which is built to give
    independent streams for related inputs, rather than fed to torch's Mersenne Twister as nearby
    integers (seed * C + step)."""
    entropy = np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(entropy))


def process_uniforms(seed: int, step: int, stream: int, rows: int, width: int, accelerator) -> torch.Tensor:
    """A sampler's draws for this process's `rows` rows: its contiguous share of one (rows x processes,
    width) draw, so the sampled tokens do not depend on the number of processes."""
    everyone = torch.rand((rows * accelerator.num_processes, width), generator=step_generator(seed, step, stream))
    return everyone[accelerator.process_index * rows:(accelerator.process_index + 1) * rows].to(accelerator.device)


def prompt_text(record, tokenizer) -> str:
    """What reward functions see as the prompt: the string itself, or the rendered chat prompt."""
    return record.prompt if isinstance(record.prompt, str) else tokenizer.decode(record.prompt_ids)


def score_samples(reward, tokenizer, records: list, batch: SampledBatch, group_size: int,
                  missing_eos_penalty: float | None, device) -> tuple[torch.Tensor | None, list[str], list[str]]:
    """What every online loop's reward sees: each record's prompt text `group_size` times, the decoded
    completions and the records' other columns. Returns (scores (B,) or None without a reward, prompts,
    completions); `missing_eos_penalty` is added to the score of every completion without EOS."""
    prompts = [prompt_text(r, tokenizer) for r in records for _ in range(group_size)]
    texts = completion_texts(tokenizer, batch)
    if reward is None:
        return None, prompts, texts
    rows = [dict(getattr(r, "extra", None) or {}) for r in records for _ in range(group_size)]
    scores = reward(prompts, texts, rows).to(device)
    if missing_eos_penalty is not None:
        scores = scores + missing_eos_penalty * batch.truncated.to(device=scores.device, dtype=scores.dtype)
    return scores, prompts, texts


def reward_parts(reward) -> dict:
    """`reward/{name}`: the batch mean of each reward source of the last scoring (`rewards[].name`)."""
    return {f"reward/{name}": part.mean() for name, part in getattr(reward, "last_parts", {}).items()}


def kl_metrics(token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """`kl`: the batch mean of the per-response k3 estimate of KL(pi||pi0) (unbiased, never negative);
    `kl_k1`: the same with k1 (the summed log-ratio, which a batch can drive below 0)."""
    return {"kl": sequence_kl_estimate(token_logps, ref_token_logps, mask).mean(),
            "kl_k1": sequence_kl_estimate(token_logps, ref_token_logps, mask, "k1").mean()}


class OnlineTrainer:
    def __init__(self, cfg: OnlineConfig, accelerator=None, log=print):
        self.cfg, self.log = cfg, log
        self.acc = accelerator or make_accelerator(cfg.train.mixed_precision, cfg.train.retain_freed_memory,
                                                   what=cfg.method)
        self.device = self.acc.device
        set_seed(cfg.train.seed)
        self.objective = get_online_objective(cfg.method)
        self.hparams = {k: getattr(cfg.loss, k) for k in ADVANTAGE_KEYS}
        self.sum_processes = process_sum(self.acc)  # whitening, baselines and token means span all processes
        self.length_norm = cfg.loss.length_norm or self.objective.length_norm
        self.group_size = cfg.generation.num_samples
        self.forward_group = self.group_size if cfg.share_prompt else 1  # rows encoded with one prompt copy
        if self.group_size < self.objective.min_group_size:
            raise ValueError(f"generation.num_samples: {cfg.method} needs at least "
                             f"{self.objective.min_group_size} samples per prompt, got {self.group_size}")
        m = cfg.model
        self.tokenizer = load_run_tokenizer(m, cfg.data)
        self.records = load_records(cfg.data, cfg.data.train, "prompts", self.tokenizer, self.log)
        lora = to_dict(m.lora) if m.lora is not None else None
        self.policy = load_policy(m.name_or_path, **m.load_options(), lora=lora, device=self.device,
                                  gradient_checkpointing=cfg.train.gradient_checkpointing)
        masters = bf16_training_weights(self.policy, cfg.train.mixed_precision, self.acc)
        needs_reference = self.objective.needs_reference(self.hparams)
        self.reference = build_reference(self.policy, cfg.model, cfg.reference, self.device) if needs_reference else None
        if masters is not None and self.reference is not None and self.reference.frozen is not None:
            bf16_linear_weights(self.reference.frozen)  # the same weights as the policy's at step 0
        self.value_head = self._value_head() if self.objective.needs_value_head else None
        # What trains (and what DDP wraps): policy + value head as one module whose forward scores a batch.
        trained = PolicyWithValueHead(self.policy, self.value_head)
        # A LoRA policy without value head is checkpointed as itself (adapter weights only).
        self.module = self.policy if is_peft_model(self.policy) and self.value_head is None else trained
        if self.acc.is_main_process:
            log_trainable_parameters(trained, log)
        t = cfg.train
        self.global_batch = t.batch_size * self.acc.num_processes
        self.steps_per_epoch = len(self.records) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.data.train}: {len(self.records)} prompts are fewer than one global batch of "
                             f"{self.global_batch} (train.batch_size x processes)")
        self.total_steps = t.max_steps or max(1, math.floor(t.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(trained, cfg.optim, masters)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim,
                                         self.total_steps * cfg.update_epochs * cfg.num_minibatches)
        self.identity = run_identity(cfg, trained, data={"train": self.records}, global_batch=self.global_batch,
                                     total_steps=self.total_steps, objective=self.objective_settings())
        self.trained, self.optimizer = self.acc.prepare(trained, self.optimizer)
        self.guard = StepGuard(self.trained.parameters(), self.optimizer, self.scheduler, cfg.optim.max_grad_norm,
                               self.acc, t.on_nonfinite, log)
        self.reward = build_reward(cfg.rewards, self.device, m.trust_remote_code)
        self.sampler = build_sampler(self.tokenizer, cfg.generation, m.name_or_path)
        # The sampler's log-probs equal the update forward's (so they can be the old policy's) in full fp32
        # only: in bf16 its decode loop and bf16 head round differently from the training forward's fp32
        # head, and the old log-probs come from a no-grad forward of the training precision instead.
        self.sampler_logps_exact = (cfg.train.mixed_precision == "no"
                                    and all(p.dtype == torch.float32 for p in self.policy.parameters()))

    def objective_settings(self) -> dict:
        """What a resume must keep: the objective's settings, the reward sources and the sampling that
        makes the rollouts (the sampler backend and its fast path may change)."""
        return {"loss": to_dict(self.cfg.loss), "rewards": [to_dict(r) for r in self.cfg.rewards],
                "generation": sampling_settings(self.cfg.generation), "update_epochs": self.cfg.update_epochs,
                "num_minibatches": self.cfg.num_minibatches}

    def forward(self, model, batch: SampledBatch, value_head=None, with_entropy: bool = False) -> ResponseForward:
        return grouped_response_forward(model, batch, self.forward_group, self.cfg.generation.temperature,
                                        value_head, with_entropy)

    def _value_head(self):
        if self.cfg.value_init == "reward_model":
            from distalign.models import load_reward_model
            rm = load_reward_model(self.cfg.value_model, trust_remote_code=self.cfg.model.trust_remote_code)
            return build_value_head(self.policy, "reward_model", rm)
        return build_value_head(self.policy, "policy")

    def step_prompts(self, step: int) -> list:
        """This process's contiguous share of the step's global batch of prompts."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.global_batch + self.acc.process_index * self.cfg.train.batch_size
        order = prompt_order(len(self.records), self.cfg.train.seed, epoch)[start:start + self.cfg.train.batch_size]
        return [self.records[i] for i in order.tolist()]

    def score(self, records: list, batch: SampledBatch) -> torch.Tensor:
        """Rewards (B,) of the decoded completions, each prompt repeated `group_size` times."""
        return score_samples(self.reward, self.tokenizer, records, batch, self.group_size,
                             self.cfg.generation.missing_eos_penalty, self.device)[0]

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[SampledBatch, RolloutTensors, dict]:
        records = self.step_prompts(step)
        start = time.perf_counter()
        rows = [r.prompt_ids for r in records for _ in range(self.group_size)]
        uniforms = process_uniforms(self.cfg.train.seed, step, SAMPLING, len(rows),
                                    self.cfg.generation.max_new_tokens, self.acc)
        with self.acc.autocast():  # the training's precision policy, and its speed
            batch = self.sampler.sample(self.policy, rows, uniforms)
        generation_time = time.perf_counter() - start
        scores = self.score(records, batch)
        if self.value_head is None and batch.token_logps is not None and self.sampler_logps_exact:
            old = ResponseForward(batch.token_logps, None, batch.entropy)
        else:
            with self.acc.autocast():
                old = self.forward(self.policy, batch, self.value_head, with_entropy=True)
        ref_token_logps = None
        if self.reference is not None:
            with self.reference.context() as ref_model, self.acc.autocast():
                ref_token_logps = self.forward(ref_model, batch).token_logps
        tensors = RolloutTensors(scores, old.token_logps, batch.response_mask, ref_token_logps, old.values,
                                 self.group_size)
        tensors = self.objective.prepare(tensors, self.hparams, self.sum_processes)
        return batch, tensors, self.rollout_metrics(batch, tensors, old.entropy, generation_time)

    def rollout_metrics(self, batch: SampledBatch, r: RolloutTensors, entropy, generation_time: float) -> dict:
        metrics = {"reward_mean": r.scores.mean(), "reward_mean_square": r.scores.square().mean(),
                   "entropy": masked_mean(entropy, r.mask), "response_length": r.mask.sum(-1).mean(),
                   "truncated_fraction": batch.truncated.float().mean(), "generation_time": generation_time}
        if r.ref_token_logps is not None:
            metrics.update(kl_metrics(r.token_logps, r.ref_token_logps, r.mask))
        metrics.update(reward_parts(self.reward))
        return metrics

    def update(self, step: int, batch: SampledBatch, rollout: RolloutTensors) -> dict:
        """`update_epochs` shuffled passes of `num_minibatches` optimizer steps over the rollout."""
        cfg, sums, updates = self.cfg, {}, 0
        loss_kwargs = {"clip_eps": cfg.loss.clip_eps, "clip_eps_high": cfg.loss.clip_eps_high,
                       "length_norm": self.length_norm, "max_length": cfg.generation.max_new_tokens,
                       "kl_coef": cfg.loss.kl_coef, "vf_coef": cfg.loss.vf_coef, "vf_clip": cfg.loss.vf_clip}
        self.trained.train()
        size = self.group_size
        within = torch.arange(size, device=rollout.scores.device)
        order = step_generator(cfg.train.seed, step, MINIBATCH_ORDER)
        for _ in range(cfg.update_epochs):
            groups = torch.randperm(len(rollout.scores) // size, generator=order).to(rollout.scores.device)
            for group_chunk in groups.chunk(cfg.num_minibatches):
                minibatch = (group_chunk[:, None] * size + within).flatten()
                metrics = self.optimizer_step(step, minibatch, batch, rollout, loss_kwargs)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v
                updates += 1
        return {k: v / updates for k, v in sums.items()}

    def optimizer_step(self, step: int, rows: torch.Tensor, batch: SampledBatch, rollout: RolloutTensors,
                       loss_kwargs: dict) -> dict:
        accumulation = self.cfg.train.gradient_accumulation_steps
        micro_batches = [m.flatten() for m in rows.view(-1, self.group_size).chunk(accumulation)]
        if self.length_norm == "token":  # one token mean over the optimizer step's rows of every process
            totals = self.sum_processes(torch.stack([rollout.mask[rows].sum(), rollout.mask.new_tensor(float(len(rows)))]))
            loss_kwargs = {**loss_kwargs, "mean_length": totals[0] / totals[1]}
        total, sums = torch.zeros((), device=self.device), {}
        for i, micro in enumerate(micro_batches):
            # DDP averages gradients over processes once, at the last micro-batch's backward.
            sync = self.acc.no_sync(self.trained) if i < len(micro_batches) - 1 else nullcontext()
            with sync, self.acc.autocast():
                out = self.trained(batch.select(micro), self.forward_group, self.cfg.generation.temperature)
                losses, metrics = self.objective.loss(out.token_logps, out.values, rollout.select(micro),
                                                      **loss_kwargs)
                loss = losses.mean() * (len(micro) / len(rows))
                self.acc.backward(loss)
            total += loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v * (len(micro) / len(rows))
        sums["grad_norm"] = self.guard.step(total, step + 1)
        return {"loss": total, **sums}

    def train_step(self, step: int) -> dict:
        start = time.perf_counter()
        batch, rollout, metrics = self.rollout(step)
        metrics.update(self.update(step, batch, rollout))
        if hasattr(self.sampler, "sync_weights"):
            self.sampler.sync_weights(self.policy)
        metrics.update(elapsed=time.perf_counter() - start, tokens=rollout.mask.sum())
        values = mean_over_processes(metrics, self.acc)  # the one host sync of the step
        processes, elapsed = self.acc.num_processes, values.pop("elapsed")
        n = len(rollout.scores) * processes  # the sample std of the global batch's rewards
        spread = max(0.0, values.pop("reward_mean_square") - values["reward_mean"] ** 2)
        values["reward_std"] = math.sqrt(spread * n / max(1, n - 1))
        values.update(completions_per_s=len(rollout.scores) * processes / elapsed,
                      tokens_per_s=values.pop("tokens") * processes / elapsed,
                      generation_share=values.pop("generation_time") / elapsed,
                      learning_rate=self.scheduler.get_last_lr()[0])
        return values

    def save(self, step: int) -> Path | None:
        return save_checkpoint_on_main(self.acc, self.cfg.train.output_dir, step, self.module, self.optimizer,
                                       self.scheduler, {"step": step}, keep=self.cfg.train.keep_checkpoints,
                                       identity=self.identity)

    def train(self) -> dict:
        t = self.cfg.train
        out = Path(t.output_dir)
        main = self.acc.is_main_process
        start = begin_run(self.cfg, out, run=t, identity=self.identity, model=self.module, optimizer=self.optimizer,
                          scheduler=self.scheduler, log=self.log, main_process=main,
                          barrier=self.acc.wait_for_everyone)["step"]
        logger = MetricsLogger(out, main, self.total_steps, start, t.progress_bar, self.cfg.method, t.report_to,
                               to_dict(self.cfg))
        window, history = LogWindow(t.log_every, self.total_steps), []
        try:
            for step in range(start, self.total_steps):
                metrics = {f"train/{k}": v for k, v in self.train_step(step).items()}
                done = step + 1
                if (line := window.add(done, metrics)) is not None:
                    logger.log(done, line)
                logger.advance()
                history.append({"step": done, **metrics})
                if t.save_every and done % t.save_every == 0 and done < self.total_steps:
                    self.save(done)
        finally:
            logger.close()
        self.save(self.total_steps)
        final = out / "final"
        if main:
            save_final(self.policy, self.tokenizer, out, t, optimizer=self.optimizer)
            if self.value_head is not None:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                          str(final / "value_head.safetensors"))
        self.acc.wait_for_everyone()
        return {"output_dir": str(out), "final_model": str(final), "steps": self.total_steps,
                "history": history, "metrics": history[-1] if history else {}}


def train_online(config: OnlineConfig, log=print) -> dict:
    """Train an online method from a validated config; returns paths, the per-step history and final metrics."""
    return OnlineTrainer(config, log=log).train()
