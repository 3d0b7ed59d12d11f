"""`IRLConfig`: alternating inverse RL (tutorial seed 002 Eq. 21) and AIHF (Eq. 24) (SPEC §2 "Online").

    distalign train aihf --config configs/aihf.yaml iterations=3
    train_irl(load_config(IRLConfig, "configs/irl.yaml"))

Each of `iterations` rounds makes `reward.steps` reward-model steps (demonstration > a fresh sample of
the current policy; aihf adds alpha * Bradley-Terry on the preference pairs), saves the reward model,
then runs Online engine I (`rl.method`) for `rl.steps` rollouts on that reward, KL-regularised toward
the fixed reference (the initial policy unless `reference` is set). The run's steps are the reward
steps and rollouts together: `train.max_steps` (if > 0) stops after that many instead of `iterations`
rounds. `train` holds what every method shares (output_dir, seed, checkpoints, resume, logging).
"""
from __future__ import annotations

from dataclasses import dataclass

from .applicability import fields, never, only, refuse_ignored, split_rule, when, with_prefix
from .online import GENERATION_RULES, ONLINE_LOSS_RULES, ONLINE_METHODS, GenerationConfig, OnlineLossConfig
from .online_pairwise import PromptDataConfig, check_response_limits
from .schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, RUN_RULES, ModelConfig, OptimConfig, RunConfig, _f

IRL_METHODS = ("irl", "aihf")


@dataclass
class RewardStepConfig:
    steps: int = _f(50, "reward-model optimizer steps per iteration (Eq. 21a / 24a)", range=AT_LEAST_ONE)
    batch_size: int = _f(16, "demonstrations (each with one fresh policy sample) and pairs per step",
                        range=AT_LEAST_ONE)
    learning_rate: float = _f(1e-4, "AdamW learning rate of the reward model (constant)", range=POSITIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay of the reward model (not on biases and norms)", range=NON_NEGATIVE)
    max_grad_norm: float = _f(1.0, "clip the reward model's gradient norm; 0 disables clipping",
                              range=NON_NEGATIVE)
    demo_weight: float = _f(1.0, "gamma of Eq. 24a: weight of the demonstration > policy-sample term",
                              range=NON_NEGATIVE)
    alpha: float = _f(1.0, "aihf: weight of the Bradley-Terry term on the preference pairs (refused for irl)",
                       range=NON_NEGATIVE)
    reinit: bool = _f(False, "start each iteration's reward model afresh from the current policy; false keeps "
                             "the reward model (and its optimizer) across iterations")
    init: str | None = _f(None, "folder / Hub id to initialise the reward model from; default: the policy")

    def validate(self):
        if self.demo_weight + self.alpha == 0:
            raise ValueError("demo_weight", "demo_weight and alpha must not both be 0")


@dataclass
class RLStepConfig:
    method: str = _f("rloo", "Online engine I method of the policy step (Eq. 21b)", choices=ONLINE_METHODS)
    steps: int = _f(20, "rollouts (optimizer steps x update_epochs x num_minibatches) per iteration",
                    range=AT_LEAST_ONE)
    batch_size: int = _f(8, "prompts per rollout", range=AT_LEAST_ONE)
    optim: OptimConfig = _f(help="policy optimiser; a fresh one each iteration", factory=OptimConfig)
    loss: OnlineLossConfig = _f(help="RL objective hyperparameters; loss.kl_coef is beta of Eq. 21b",
                                factory=OnlineLossConfig)
    update_epochs: int = _f(1, "passes over each rollout (PPO epochs)", range=AT_LEAST_ONE)
    num_minibatches: int = _f(1, "optimizer steps per pass over a rollout", range=AT_LEAST_ONE)


IRL_RULES = {
    **with_prefix(ONLINE_LOSS_RULES, "rl.", lambda c: c.rl), **GENERATION_RULES,
    "reference": when(lambda c: c.rl.loss.kl_coef == 0, "rl.loss.kl_coef is 0, so the RL step uses no reference"),
    "data.eval": never("irl / aihf have no evaluation loop (run `distalign eval` on the saved model)"),
    "data.split": split_rule("data.train", "demonstrations", "pairs"),
    "pairs": only("aihf"), "reward.alpha": only("aihf"),
    "iterations": when(lambda c: c.train.max_steps > 0, "train.max_steps sets the length"),
    **fields(("train.batch_size", "train.gradient_accumulation_steps", "train.epochs", "train.log_every"),
             never("reward.* and rl.* set the batches and steps (every step is logged)")),
    "train.eval_every": never("irl / aihf have no evaluation loop (run `distalign eval` on the saved model)"),
    "train.save_merged": never("irl / aihf train full weights (no LoRA adapter to merge)"),
    "train.resume_allow": RUN_RULES["train.resume_allow"],
}


@dataclass
class IRLConfig:
    method: str = _f("", "irl | aihf", choices=IRL_METHODS)
    model: ModelConfig = _f(help="the policy (the SFT model); also the reward model's backbone by default",
                            factory=ModelConfig)
    reference: str | None = _f(None, "pi_ref of the KL term; default: the initial policy (fixed over iterations)")
    data: PromptDataConfig = _f(help="prompts of the RL step (data.train; default: the demonstration prompts) "
                                     "and the length limits of every file", factory=PromptDataConfig)
    demonstrations: str = _f("", "demonstrations file {prompt, completion}: the expert side of Eq. 21a")
    pairs: str | None = _f(None, "preference pairs file {prompt, chosen, rejected} (aihf)")
    train: RunConfig = _f(help="output_dir (gets iter-{t}/reward, iter-{t}/rl/ and final/, the last policy), seed, "
                               "max_steps (reward steps + rollouts), checkpoints, resume, logging",
                          factory=RunConfig)
    iterations: int = _f(2, "outer iterations t = 1..K of reward step then RL step (not with train.max_steps > 0, "
                            "which sets the length)", range=AT_LEAST_ONE)
    generation: GenerationConfig = _f(help="sampling of the reward step's policy samples and of the RL rollouts",
                                      factory=lambda: GenerationConfig(num_samples=4, temperature=1.0))
    reward: RewardStepConfig = _f(help="the reward update (Eq. 21a / 24a)", factory=RewardStepConfig)
    rl: RLStepConfig = _f(help="the policy update (Eq. 21b) by Online engine I", factory=RLStepConfig)

    def validate(self):
        if not self.method:
            raise ValueError("method", "required but missing")
        if not self.demonstrations:
            raise ValueError("demonstrations", f"method {self.method} needs a demonstrations file")
        if self.method == "aihf" and not self.pairs:
            raise ValueError("pairs", "method aihf needs a preference pairs file")
        if self.model.lora is not None:
            raise ValueError("model", "lora: not supported by irl / aihf (each iteration reloads full weights)")
        check_response_limits(self.data)
        refuse_ignored(self, IRL_RULES)
