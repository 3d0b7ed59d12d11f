"""Alternating inverse RL and AIHF: learn a reward from demonstrations (and preference pairs), then
run RL on it, repeated (tutorial seed 002 §V-A Eq. 20-21, §V-B Eq. 23-24; SPEC §2 "Online").

    distalign train irl --config configs/irl.yaml
    train_irl(load_config(IRLConfig, "configs/aihf.yaml"))

Iteration t = 1..K:
  (a) reward step (Eq. 21a / 24a with l = log sigma, `aihf_reward_loss`): `reward.steps` AdamW steps of
      demo_weight * -log sigma(r(x, y) - r(x, y')) over a batch of demonstrations (x, y), each with one
      fresh sample y' ~ pi_t of the current policy, plus (aihf) alpha * -log sigma(r(y_w) - r(y_l)) over a
      batch of preference pairs. The reward model is an AutoModelForSequenceClassification (1 label)
      initialised from the policy and kept across iterations (or re-initialised: `reward.reinit`).
  (b) policy step (Eq. 21b): Online engine I (`train_online`, method `rl.method`) for `rl.steps`
      rollouts on the freshly saved reward model, with KL(pi || pi_ref) toward the fixed initial policy.
Simplifications, stated honestly: each argmin / argmax is a fixed number of steps, not a solve; the RL
step starts a fresh optimizer every iteration; samples y' are scored as text exactly as the RL step's
reward source scores them (decoded, re-tokenised, EOS appended), so the reward sees one format.

Steps, checkpoints and resume: the run's step counter runs over reward steps and rollouts together
(round t: `reward.steps`, then `rl.steps`; `train.max_steps` cuts the plan short). Checkpoints in
output_dir hold the reward model, its optimizer, the RNG and the current policy's folder: every
`train.save_every` reward steps, at the end of each reward step phase and of each round; an RL step is
its own Online engine I run in iter-{t}/rl with its own checkpoints (removed once its round is done),
which a resume continues. So `train.resume=true` repeats the uninterrupted run bit for bit.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distalign.config import build_dataclass, to_dict
from distalign.config.irl import IRLConfig
from distalign.config.online import OnlineConfig
from distalign.config.schema import OptimConfig
from distalign.data import tokenize_responses
from distalign.models import (
    collate_sequences,
    load_policy,
    load_reward_model,
    save_model,
    score_sequences,
)
from distalign.objectives.online_pairwise import aihf_reward_loss

from .checkpoint import begin_run, latest_checkpoint, list_checkpoints, run_identity, save_checkpoint
from .common import (
    StepGuard,
    build_optimizer,
    require_single_process,
    sampling_settings,
    set_seed,
)
from .metrics_log import MetricsLogger
from .online import prompt_order, train_online
from .rollout import completion_texts
from .run_data import load_records, load_run_tokenizer
from .sampling import build_sampler


class RewardLearner:
    """The reward model of Eq. 24a, its optimizer and the demonstration / pair records it trains on."""

    def __init__(self, cfg: IRLConfig, tokenizer, device, log=print):
        self.cfg, self.tokenizer, self.device, self.log = cfg, tokenizer, device, log
        self.pad = tokenizer.pad_token_id
        self.demos = self.load(cfg.demonstrations, "demonstrations")
        self.pairs = self.load(cfg.pairs, "pairs") if cfg.method == "aihf" and cfg.reward.alpha > 0 else None
        self.model, self.optimizer = None, None

    def load(self, path: str, kind: str) -> list:
        records = load_records(self.cfg.data, path, kind, self.tokenizer, self.log)
        if len(records) < self.cfg.reward.batch_size:
            raise ValueError(f"{path}: {len(records)} usable {kind}, fewer than reward.batch_size="
                             f"{self.cfg.reward.batch_size}")
        return records

    def start_iteration(self, policy_dir: str) -> None:
        """Load the reward model on the first iteration (or every one with reward.reinit)."""
        if self.model is not None and not self.cfg.reward.reinit:
            return
        r, m = self.cfg.reward, self.cfg.model
        self.model = load_reward_model(r.init or policy_dir, **m.load_options(), device=self.device,
                                       pad_token_id=self.pad,
                                       gradient_checkpointing=self.cfg.train.gradient_checkpointing)
        self.optimizer = build_optimizer(self.model, OptimConfig(learning_rate=r.learning_rate,
                                                                 weight_decay=r.weight_decay))
        self.guard = StepGuard(self.model.parameters(), self.optimizer, None, r.max_grad_norm, None,
                               self.cfg.train.on_nonfinite, self.log)

    def batch_of(self, records: list, step: int) -> list:
        """The step-th batch of a fixed-seed permutation per epoch (the online loops' data order)."""
        bs = self.cfg.reward.batch_size
        epoch, in_epoch = divmod(step, len(records) // bs)
        order = prompt_order(len(records), self.cfg.train.seed, epoch)[in_epoch * bs:(in_epoch + 1) * bs]
        return [records[i] for i in order.tolist()]

    @torch.no_grad()
    def policy_samples(self, policy, sampler, prompt_ids: list) -> list[list[int]]:
        """y' ~ pi_t for each prompt, as the reward source will see it: decoded text re-tokenised + EOS."""
        texts = completion_texts(self.tokenizer, sampler.sample(policy, prompt_ids))
        return tokenize_responses(texts, self.tokenizer)

    def scores(self, prompts: list, responses: list) -> torch.Tensor:
        batch = collate_sequences(prompts, responses, self.pad)
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return score_sequences(self.model, batch)

    def step(self, step: int, policy, sampler, global_step: int) -> dict:
        """One AdamW step on `aihf_reward_loss` (Eq. 24a); all sequences in one forward. `step` counts
        reward steps (it orders the data), `global_step` (1-based) is the run's, named in messages."""
        r = self.cfg.reward
        demos = self.batch_of(self.demos, step)
        prompts = [d.prompt_ids for d in demos]
        samples = self.policy_samples(policy, sampler, prompts)
        all_prompts, responses = prompts + prompts, [d.completion_ids for d in demos] + samples
        if self.pairs is not None:
            pairs = self.batch_of(self.pairs, step)
            all_prompts += [p.prompt_ids for p in pairs] * 2
            responses += [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        self.model.train()
        values = self.scores(all_prompts, responses)
        n = len(demos)
        demo, sample, rest = values[:n], values[n:2 * n], values[2 * n:]
        chosen, rejected = rest.chunk(2) if self.pairs is not None else (None, None)
        loss = aihf_reward_loss(demo, sample, chosen, rejected, r.demo_weight, r.alpha)
        loss.backward()
        metrics = {"reward_loss": loss.detach(), "demo_accuracy": (demo > sample).float().mean(),
                   "demo_margin": (demo - sample).mean().detach()}
        if chosen is not None:
            metrics["pair_accuracy"] = (chosen > rejected).float().mean()
        metrics["grad_norm"] = self.guard.step(loss, global_step)
        return {k: float(v) for k, v in metrics.items()}


def online_config(cfg: IRLConfig, policy_dir: str, reward_dir: Path, out_dir: Path, iteration: int,
                  steps: int) -> OnlineConfig:
    """The Online engine I config of one policy step, validated like a YAML config; it continues its own
    checkpoint if it has one (a resumed IRL run), else starts afresh in its folder."""
    rl, t = cfg.rl, cfg.train
    resume = latest_checkpoint(out_dir) is not None
    tree = {"method": rl.method, "model": {**to_dict(cfg.model), "name_or_path": policy_dir},
            "reference": (cfg.reference or cfg.model.name_or_path) if rl.loss.kl_coef else None,
            # the RL step reads prompts only: max_length (a response limit) is the reward step's
            "data": {**{k: v for k, v in to_dict(cfg.data).items() if k != "max_length"},
                     "train": cfg.data.train or cfg.demonstrations},
            "optim": to_dict(rl.optim), "generation": to_dict(cfg.generation), "loss": to_dict(rl.loss),
            # scored with the prompts rendered as the reward step rendered them (chat template, system prompt)
            "rewards": [{"kind": "model", "path": str(reward_dir), "name": "learned",
                         "kwargs": {"chat_template": cfg.data.chat_template, "system": cfg.data.system}}],
            "train": {"output_dir": str(out_dir), "seed": t.seed + iteration, "batch_size": rl.batch_size,
                      "max_steps": steps, "log_every": 1, "keep_checkpoints": t.keep_checkpoints,
                      "save_every": t.save_every, "progress_bar": t.progress_bar, "resume": resume,
                      "overwrite": not resume, "report_to": t.report_to, "on_nonfinite": t.on_nonfinite,
                      "mixed_precision": t.mixed_precision, "retain_freed_memory": t.retain_freed_memory,
                      "gradient_checkpointing": t.gradient_checkpointing},
            "update_epochs": rl.update_epochs, "num_minibatches": rl.num_minibatches}
    return build_dataclass(OnlineConfig, tree, f"{out_dir} (irl rl step)")


def round_plan(cfg: IRLConfig) -> list[tuple[int, int]]:
    """(reward steps, rollouts) of each round: `iterations` full rounds, or rounds until `train.max_steps`
    steps are spent (reward steps first in each)."""
    full = (cfg.reward.steps, cfg.rl.steps)
    if not cfg.train.max_steps:
        return [full] * cfg.iterations
    plan, left = [], cfg.train.max_steps
    while left > 0:
        reward = min(full[0], left)
        plan.append((reward, min(full[1], left - reward)))
        left -= sum(plan[-1])
    return plan


class IRLRun:
    """One irl / aihf run: the reward learner, the run folder and the round plan."""

    def __init__(self, cfg: IRLConfig, log=print):
        require_single_process(cfg.method)
        self.cfg, self.log, self.out = cfg, log, Path(cfg.train.output_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        set_seed(cfg.train.seed)
        m = cfg.model
        self.tokenizer = load_run_tokenizer(m, cfg.data)
        self.learner = RewardLearner(cfg, self.tokenizer, self.device, log)
        self.learner.start_iteration(m.name_or_path)  # the first round's reward model (a resume loads into it)
        self.plan = round_plan(cfg)
        data = {"demonstrations": self.learner.demos, **({"pairs": self.learner.pairs} if self.learner.pairs else {})}
        self.identity = run_identity(cfg, self.learner.model, data=data, global_batch=cfg.reward.batch_size,
                                     total_steps=sum(map(sum, self.plan)),
                                     objective={"reward": to_dict(cfg.reward), "rl": to_dict(cfg.rl),
                                                "generation": sampling_settings(cfg.generation)})
        self.history, self.rounds, self.rl_metrics = [], [], {}

    def save(self, step: int, policy_dir: str) -> None:
        save_checkpoint(self.out, step, self.learner.model, self.learner.optimizer, None,
                        {"step": step, "policy_dir": policy_dir}, self.cfg.train.keep_checkpoints, self.identity)

    def reward_phase(self, t: int, step: int, end: int, reward_offset: int, policy_dir: str, logger) -> Path:
        """Reward steps `step`..`end` of round t (global numbering; `reward_offset` = reward steps before
        this round's first); saves the reward model to iter-{t+1}/reward and a checkpoint at `end`."""
        m, save_every = self.cfg.model, self.cfg.train.save_every
        policy = load_policy(policy_dir, **m.load_options(), device=self.device)
        sampler = build_sampler(self.tokenizer, self.cfg.generation, policy_dir)
        start = end - self.plan[t][0]
        while step < end:
            metrics = {f"reward/{k}": v for k, v in
                       self.learner.step(reward_offset + step - start, policy, sampler, step + 1).items()}
            step += 1
            logger.log(step, {**metrics, "iteration": t})
            self.history.append({"step": step, "iteration": t, **metrics})
            if step < end and save_every and step % save_every == 0:
                self.save(step, policy_dir)
        reward_dir = save_model(self.learner.model, self.tokenizer, self.out / f"iter-{t + 1}" / "reward")
        self.save(end, policy_dir)
        return reward_dir

    def train(self) -> dict:
        cfg = self.cfg
        state = begin_run(cfg, self.out, run=cfg.train, identity=self.identity, model=self.learner.model,
                          optimizer=self.learner.optimizer, log=self.log)
        step, policy_dir = state["step"], state.get("policy_dir", cfg.model.name_or_path)
        logger = MetricsLogger(self.out, True, self.identity["max_steps"], step, False, cfg.method,
                               cfg.train.report_to, to_dict(cfg))
        first, reward_offset = 0, 0
        try:
            for t, (reward_steps, rollouts) in enumerate(self.plan):
                reward_end, end = first + reward_steps, first + reward_steps + rollouts
                reward_dir = self.out / f"iter-{t + 1}" / "reward"
                self.rl_metrics = {}  # stays empty for a round a resumed run finds already done
                if step < reward_end:
                    if step == first and t > 0:
                        self.learner.start_iteration(policy_dir)
                    reward_dir = self.reward_phase(t, step, reward_end, reward_offset, policy_dir, logger)
                    step = reward_end
                if step < end:
                    policy_dir = self.rl_phase(t, policy_dir, reward_dir, rollouts, end)
                    step = end
                self.rounds.append({"iteration": t + 1, "reward_model": str(reward_dir), "policy": policy_dir,
                                    "reward": self.history[-1] if self.history else {}, "rl": self.rl_metrics})
                first, reward_offset = end, reward_offset + reward_steps
        finally:
            logger.close()
        final = self.out / "final"
        shutil.copytree(policy_dir, final, dirs_exist_ok=True)
        return {"output_dir": str(self.out), "final_model": str(final), "steps": step, "history": self.history,
                "iterations": self.rounds, "metrics": self.history[-1] if self.history else {}}

    def rl_phase(self, t: int, policy_dir: str, reward_dir: Path, rollouts: int, end: int) -> str:
        """Round t's RL step (continuing its own checkpoint if a resume finds one); then the round's
        checkpoint, after which the RL run's step checkpoints (optimizer state) are no longer needed."""
        rl_dir = self.out / f"iter-{t + 1}" / "rl"
        result = train_online(online_config(self.cfg, policy_dir, reward_dir, rl_dir, t, rollouts), log=self.log)
        self.rl_metrics = result["metrics"]
        self.log(f"{self.cfg.method} iteration {t + 1}: demo accuracy "
                 f"{self.history[-1]['reward/demo_accuracy'] if self.history else float('nan'):.3f}, "
                 f"rl reward {result['metrics'].get('train/reward_mean', float('nan')):.3f}")
        self.save(end, result["final_model"])
        for checkpoint in list_checkpoints(rl_dir):
            shutil.rmtree(checkpoint, ignore_errors=True)
        return result["final_model"]


def train_irl(config: IRLConfig, log=print) -> dict:
    """irl or aihf from a validated config: K rounds of reward step then RL step.

    Returns output_dir, final_model (the last policy, copied to output_dir/final), `history` (one entry
    per reward step, keyed reward/...) and `iterations` (per round: reward and policy folders, the last
    reward-step metrics and the RL run's last metrics).
    """
    return IRLRun(config, log).train()
