"""`MixedFeedbackConfig`: the tutorial's §VI comparison (seed 002) on the language testbed as one config.

    distalign testbed mixed-feedback --config configs/mixed_feedback.yaml --out runs/mixed-feedback

Unset step counts come from the experiment's quick or full plan (`testbed.experiments.mixed_feedback`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .schema import _f

MIXED_FEEDBACK_METHODS = ("dpo", "ipo", "rpo_demos", "spac", "spin", "aihf")
PLAN_KEYS = ("sft_steps", "n_pairs", "n_demos", "offline_steps", "iterative_steps", "iterations",
             "aihf_iterations", "rl_steps", "reward_steps", "n_eval")


@dataclass
class MixedFeedbackConfig:
    method: str = _f("mixed_feedback", "the testbed experiment this config runs", choices=("mixed_feedback",))
    methods: list[str] = _f(help=f"methods compared, from {', '.join(MIXED_FEEDBACK_METHODS)}",
                            factory=lambda: list(MIXED_FEEDBACK_METHODS))
    quick: bool = _f(False, "start from the quick plan (about a minute) instead of the full one")
    seed: int = _f(0, "world, data and training seed")
    beta: float = _f(1.0, "the shared beta of every method (the world's gamma)")
    learning_rate: float = _f(1e-3, "the shared learning rate of every method")
    sft_steps: int | None = _f(None, "SFT steps on pi0 samples for the common start")
    n_pairs: int | None = _f(None, "preference pairs (a, b ~ pi0, labelled by pi*)")
    n_demos: int | None = _f(None, "demonstrations (y ~ pi*)")
    offline_steps: int | None = _f(None, "DPO / IPO steps")
    iterative_steps: int | None = _f(None, "steps per iteration of SPIN / SPAC / RPO")
    iterations: int | None = _f(None, "SPIN / SPAC iterations")
    aihf_iterations: int | None = _f(None, "AIHF reward + RL rounds")
    rl_steps: int | None = _f(None, "AIHF RL (RLOO) steps per round")
    reward_steps: int | None = _f(None, "AIHF reward steps per round")
    n_eval: int | None = _f(None, "prompts sampled for the win-rate and KL(pi||SFT) estimates")

    def validate(self):
        unknown = sorted(set(self.methods) - set(MIXED_FEEDBACK_METHODS))
        if unknown or not self.methods:
            raise ValueError("methods", f"need a non-empty subset of {', '.join(MIXED_FEEDBACK_METHODS)}; "
                                        f"unknown: {unknown}")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise ValueError("beta", "beta and learning_rate must be > 0")
        for key in PLAN_KEYS:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(key, "must be >= 1")

    def plan_overrides(self) -> dict:
        return {key: getattr(self, key) for key in PLAN_KEYS if getattr(self, key) is not None}
