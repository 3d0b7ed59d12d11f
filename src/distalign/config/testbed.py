"""`MixedFeedbackConfig`: the tutorial's §VI comparison (seed 002) on the language testbed as one config.

    distalign testbed mixed-feedback --config configs/mixed_feedback.yaml --out runs/mixed-feedback

Unset step counts come from the experiment's quick or full plan (`testbed.experiments.mixed_feedback`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .schema import AT_LEAST_ONE, POSITIVE, SEED, _f

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
