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
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distalign.config import build_dataclass, to_dict
from distalign.config.irl import IRLConfig
from distalign.config.online import OnlineConfig
from distalign.data import tokenize_responses
from distalign.models import (
    collate_sequences,
    load_policy,
    load_reward_model,
    load_tokenizer,
    save_model,
    score_sequences,
)
from distalign.objectives.online_pairwise import aihf_reward_loss

from .checkpoint import begin_run
from .common import MetricsLogger, check_finite, load_records, require_single_process, set_seed
from .online import prompt_order, train_online
from .rollout import completion_texts
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
                                       pad_token_id=self.pad, gradient_checkpointing=self.cfg.gradient_checkpointing)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=r.learning_rate, weight_decay=r.weight_decay)

    def batch_of(self, records: list, step: int) -> list:
        """The step-th batch of a fixed-seed permutation per epoch (the online loops' data order)."""
        bs = self.cfg.reward.batch_size
        epoch, in_epoch = divmod(step, len(records) // bs)
        order = prompt_order(len(records), self.cfg.seed, epoch)[in_epoch * bs:(in_epoch + 1) * bs]
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

    def step(self, step: int, policy, sampler) -> dict:
        """One AdamW step on `aihf_reward_loss` (Eq. 24a); all sequences in one forward."""
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
        check_finite(loss.detach(), step + 1)
        loss.backward()
        metrics = {"reward_loss": loss.detach(), "demo_accuracy": (demo > sample).float().mean(),
                   "demo_margin": (demo - sample).mean().detach()}
        if chosen is not None:
            metrics["pair_accuracy"] = (chosen > rejected).float().mean()
        if r.max_grad_norm > 0:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in metrics.items()}


def online_config(cfg: IRLConfig, policy_dir: str, reward_dir: Path, out_dir: Path, iteration: int) -> OnlineConfig:
    """The Online engine I config of one policy step, validated like a YAML config."""
    rl = cfg.rl
    tree = {"method": rl.method, "model": {**to_dict(cfg.model), "name_or_path": policy_dir},
            "reference": (cfg.reference or cfg.model.name_or_path) if rl.loss.kl_coef else None,
            # the RL step reads prompts only: max_length (a response limit) is the reward step's
            "data": {**{k: v for k, v in to_dict(cfg.data).items() if k != "max_length"},
                     "train": cfg.data.train or cfg.demonstrations},
            "optim": to_dict(rl.optim), "generation": to_dict(cfg.generation), "loss": to_dict(rl.loss),
            "rewards": [{"kind": "model", "path": str(reward_dir), "name": "learned"}],
            "train": {"output_dir": str(out_dir), "seed": cfg.seed + iteration, "batch_size": rl.batch_size,
                      "max_steps": rl.steps, "log_every": 1, "keep_checkpoints": 1,
                      "progress_bar": cfg.progress_bar, "gradient_checkpointing": cfg.gradient_checkpointing},
            "update_epochs": rl.update_epochs, "num_minibatches": rl.num_minibatches}
    return build_dataclass(OnlineConfig, tree, f"{out_dir} (irl rl step)")


def train_irl(config: IRLConfig, log=print) -> dict:
    """irl or aihf from a validated config: K rounds of reward step then RL step.

    Returns output_dir, final_model (the last policy, copied to output_dir/final), `history` (one entry
    per reward step, keyed reward/...) and `iterations` (per round: reward and policy folders, the last
    reward-step metrics and the RL run's last metrics).
    """
    cfg, out = config, Path(config.output_dir)
    require_single_process(cfg.method)
    begin_run(cfg, out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(cfg.seed)
    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
    learner = RewardLearner(cfg, tokenizer, device, log)
    policy_dir, history, rounds, step = m.name_or_path, [], [], 0
    logger = MetricsLogger(out, True, cfg.iterations * cfg.reward.steps, 0, False, cfg.method)
    try:
        for t in range(cfg.iterations):
            learner.start_iteration(policy_dir)
            policy = load_policy(policy_dir, **m.load_options(), device=device)
            sampler = build_sampler(tokenizer, cfg.generation, policy_dir)
            for _ in range(cfg.reward.steps):
                metrics = {f"reward/{k}": v for k, v in learner.step(step, policy, sampler).items()}
                step += 1
                logger.log(step, {**metrics, "iteration": t})
                history.append({"step": step, "iteration": t, **metrics})
            del policy, sampler
            reward_dir = save_model(learner.model, tokenizer, out / f"iter-{t + 1}" / "reward")
            result = train_online(online_config(cfg, policy_dir, reward_dir, out / f"iter-{t + 1}" / "rl", t), log=log)
            policy_dir = result["final_model"]
            rounds.append({"iteration": t + 1, "reward_model": str(reward_dir), "policy": policy_dir,
                           "reward": history[-1], "rl": result["metrics"]})
            log(f"{cfg.method} iteration {t + 1}: demo accuracy {history[-1]['reward/demo_accuracy']:.3f}, "
                f"rl reward {result['metrics'].get('train/reward_mean', float('nan')):.3f}")
    finally:
        logger.close()
    final = out / "final"
    shutil.copytree(policy_dir, final, dirs_exist_ok=True)
    return {"output_dir": str(out), "final_model": str(final), "steps": step, "history": history,
            "iterations": rounds, "metrics": history[-1] if history else {}}
