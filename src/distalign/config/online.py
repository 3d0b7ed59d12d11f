"""`OnlineConfig`: PPO, REINFORCE, RLOO, GRPO and reverse KL (SPEC §2 "Online").

One training step = one rollout: `train.batch_size` prompts x `generation.num_samples` completions,
scored by the reward sources, then `update_epochs` passes of `num_minibatches` optimizer steps each.
`train.max_steps` counts rollouts (0: `train.epochs` passes over the prompts).
"""
from __future__ import annotations

from dataclasses import dataclass

from .applicability import first_reason, never, only, refuse_ignored, split_rule, when
from .plugins import import_callable
from .schema import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, REAL, UNIT, DataConfig, ModelConfig, OptimConfig,
                     RUN_RULES, RunConfig, _f, check_chat_fields)

ONLINE_METHODS = ("ppo", "reinforce", "rloo", "grpo", "reverse_kl")


@dataclass
class PromptsConfig(DataConfig):
    """`DataConfig` of a prompts file: nothing of a response is tokenised, so `max_length` is never read
    (and refused: `generation.max_new_tokens` bounds the responses)."""

    def validate(self):
        if not self.train:
            raise ValueError("train", "required but missing")
        check_chat_fields(self)


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(64, "stop after this many new tokens (the sample is then 'truncated')",
                             range=AT_LEAST_ONE)
    temperature: float = _f(0.7, "sampling temperature; log-probs are scored with the same logits / T",
                              range=POSITIVE)
    top_k: int = _f(0, "top-k sampling; 0 disables (keep 0 so scored log-probs match the sampler)",
                    range=NON_NEGATIVE)
    top_p: float = _f(1.0, "nucleus sampling; 1.0 disables (keep 1.0 so scored log-probs match the sampler)",
                        range="(0, 1]")
    num_samples: int = _f(4, "completions per prompt (the group size of RLOO / GRPO / reverse KL baselines)",
                          range=AT_LEAST_ONE)
    min_new_tokens: int = _f(0, "EOS is not sampled before this many tokens (stored log-probs stay "
                                 "unrestricted)", range=NON_NEGATIVE)
    missing_eos_penalty: float | None = _f(None, "added to the reward of completions without EOS (e.g. -1)",
                                         range=REAL)
    backend: str = _f("hf", "sampler: 'hf' (own KV-cache decode loop, one prefill per prompt), 'generate' "
                            "(model.generate) or 'vllm' (needs vllm installed)", choices=("hf", "generate", "vllm"))
    fast_decode: bool = _f(True, "backend hf: decode Llama / Mistral / Qwen2 through distalign's lean step (fused "
                                 "q|k|v and gate|up, in-place cache); false steps through the model's forward "
                                 "(other architectures always do)")

    def validate(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens", "must be between 0 and max_new_tokens")


@dataclass
class RewardSpec:
    kind: str = _f("callable", "model | callable | exact_answer | regex",
                   choices=("model", "callable", "exact_answer", "regex"))
    path: str = _f("", "reward model folder / Hub id (kind=model) or 'module:function' (kind=callable)")
    pattern: str = _f("", "regular expression (kind=regex)")
    weight: float = _f(1.0, "weight of this source in the summed reward (negative: a penalty)", range=REAL)
    name: str = _f("", "name under which this part is logged (default kind_index)")
    kwargs: dict = _f(help="extra keyword arguments for the function / reward model source", factory=dict)

    def validate(self):
        if self.kind in ("model", "callable") and not self.path:
            raise ValueError("path", f"required for kind {self.kind!r} (" + (
                "a reward model folder or Hub id)" if self.kind == "model" else "'module:function')"))
        if self.kind == "regex" and not self.pattern:
            raise ValueError("pattern", "required for kind 'regex'")
        if self.kind == "callable":
            try:
                import_callable(self.path)   # so a bad plugin fails now, before any model loads
            except ValueError as err:
                raise ValueError("path", str(err)) from None
        if self.pattern and self.kind != "regex":
            raise ValueError("pattern", f"has no effect for kind {self.kind}: only kind regex reads a pattern")
        if self.path and self.kind not in ("model", "callable"):
            raise ValueError("path", f"has no effect for kind {self.kind}: only kinds model and callable read a path")


@dataclass
class OnlineLossConfig:
    kl_coef: float = _f(0.05, "beta: KL(pi||pi0) weight (reward shaping for ppo/reinforce/rloo/reverse_kl, "
                              "k3 term in the loss for grpo); 0 skips the reference model",
                        range=NON_NEGATIVE)
    entropy_coef: float = _f(0.0, "gamma of reverse KL (seed 001 Eq. 16): entropy bonus weight",
                             range=NON_NEGATIVE)
    gamma: float = _f(1.0, "PPO discount", range=UNIT)
    lam: float = _f(0.95, "PPO GAE lambda", range=UNIT)
    whiten_advantages: bool = _f(True, "PPO: whiten advantages over the rollout")
    scale_rewards: bool = _f(True, "GRPO: divide by the group std (false = Dr. GRPO)")
    clip_eps: float = _f(0.2, "ratio clip: 1 - clip_eps .. 1 + clip_eps_high (acts from the second optimizer "
                              "step on a rollout: update_epochs > 1 or num_minibatches > 1)", range=POSITIVE)
    clip_eps_high: float | None = _f(None, "upper ratio clip (DAPO clip-higher); default clip_eps",
                                      range=POSITIVE)
    vf_coef: float = _f(0.1, "PPO value-loss weight", range=NON_NEGATIVE)
    vf_clip: float = _f(0.2, "PPO value clipping range", range=POSITIVE)
    length_norm: str | None = _f(None, "per-token loss aggregation: sequence (mean over each response's tokens) "
                                          "| token (DAPO: one mean over the step's tokens) | constant (Dr. GRPO: "
                                          "sum / max_new_tokens). Default: the method's own: grpo sequence (the "
                                          "GRPO paper's; TRL's GRPOTrainer defaults to token-level 'dapo', our "
                                          "'token'), ppo token, reinforce / rloo / reverse_kl constant",
                                 choices=("sequence", "token", "constant"))


SINGLE_PASS = ("each rollout gets one optimizer step (update_epochs = num_minibatches = 1), where "
               "pi / pi_old = 1 and nothing is clipped")
NO_EVALUATION = "online methods have no evaluation loop (run `distalign eval` on the saved model)"
PROMPTS_ONLY = "its data are prompts, which have no response to truncate (generation.max_new_tokens bounds those)"


def _single_pass(config) -> bool:
    return config.update_epochs == 1 and config.num_minibatches == 1


# Fields of `OnlineLossConfig` that not every method reads (relative to a config with `method`, `loss`,
# `update_epochs`, `num_minibatches`: OnlineConfig itself, or IRLConfig's `rl`).
ONLINE_LOSS_RULES = {
    "loss.entropy_coef": only("reverse_kl"),
    "loss.gamma": only("ppo"), "loss.lam": only("ppo"), "loss.whiten_advantages": only("ppo"),
    "loss.vf_coef": only("ppo"),
    "loss.vf_clip": first_reason(only("ppo"), when(_single_pass, SINGLE_PASS)),
    "loss.scale_rewards": only("grpo"),
    "loss.clip_eps": when(_single_pass, SINGLE_PASS),
    "loss.clip_eps_high": when(_single_pass, SINGLE_PASS),
}
GENERATION_RULES = {
    "generation.fast_decode": when(lambda c: c.generation.backend != "hf", "only backend hf has the fast decode step"),
}
ONLINE_RULES = {
    **ONLINE_LOSS_RULES, **GENERATION_RULES,
    "reference": when(lambda c: c.loss.kl_coef == 0, "loss.kl_coef is 0, so no reference model is used"),
    "value_init": only("ppo"),
    "value_model": first_reason(only("ppo"), when(lambda c: c.value_init != "reward_model",
                                                  "value_init is 'policy' (set value_init=reward_model)")),
    "data.eval": never(NO_EVALUATION),
    "train.eval_every": never(NO_EVALUATION),
    "data.split": split_rule("data.train"),
    "data.max_length": never(PROMPTS_ONLY),
    **RUN_RULES,
}


@dataclass
class OnlineConfig:
    method: str = _f("", "ppo | reinforce | rloo | grpo | reverse_kl", choices=ONLINE_METHODS)
    model: ModelConfig = _f(help="the policy", factory=ModelConfig)
    reference: str | None = _f(None, "reference model path/id; default: the policy's initial weights")
    data: PromptsConfig = _f(help="prompts (a 'prompt' column; other columns reach reward functions)",
                             factory=PromptsConfig)
    optim: OptimConfig = _f(help="optimiser and schedule", factory=OptimConfig)
    train: RunConfig = _f(help="loop, batching (batch_size = prompts per rollout), checkpoints",
                          factory=RunConfig)
    generation: GenerationConfig = _f(help="sampling", factory=GenerationConfig)
    rewards: list[RewardSpec] = _f(help="reward sources, summed with their weights", factory=list)
    loss: OnlineLossConfig = _f(help="objective hyperparameters", factory=OnlineLossConfig)
    update_epochs: int = _f(1, "passes over each rollout (PPO epochs)", range=AT_LEAST_ONE)
    num_minibatches: int = _f(1, "optimizer steps per pass over a rollout", range=AT_LEAST_ONE)
    share_prompt: bool = _f(True, "score each prompt's samples in one row [prompt|c1..ck] with a 4D mask "
                                  "(fewer tokens; turn off when k x max_new_tokens dwarfs the prompt)")
    value_init: str = _f("policy", "PPO value head: zero-initialised on the policy, or copied from the "
                                   "reward model's score head", choices=("policy", "reward_model"))
    value_model: str | None = _f(None, "reward model to copy the value head from (value_init=reward_model)")

    def validate(self):
        if not self.method:
            raise ValueError("method", "required but missing")
        if not self.rewards:
            raise ValueError("rewards", "at least one reward source is required")
        if self.value_init == "reward_model" and not self.value_model:
            raise ValueError("value_model", "required when value_init is 'reward_model'")
        refuse_ignored(self, ONLINE_RULES)
