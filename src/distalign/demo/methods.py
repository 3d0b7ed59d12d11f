"""The demo's rows and their settings: what is fixed, what the sweep tries, and what it chose.

Every online method appears twice: scored by the learned reward model (what a real pipeline has) and
by the oracle reward gamma * log pi*(y|x) (`distalign.testbed.lm_data.world_logprob_reward`), so that
a reader sees which gap is the objective's and which is the reward model's.

How the settings were chosen (`distalign demo --sweep`, once per variant): on the validation seed
`VALIDATION_SEED` (its own world, data and initialisation; the demo reports seed 0), each row trains
every setting of its grid with the demo's own steps and is scored by the exact KL(pi*||pi), the
distribution-learning error the framework is about; the lowest wins. Every row gets the same budget:
`len(grid) == GRID_SIZE` settings of one coefficient, everything else (learning rate, steps, batch,
sampling) shared. The sweep writes its record (grid, every score, the choice) to sweep.json; the copies
in docs/demo_sweep_{full,quick}.json are the record behind `CHOSEN` (tests/test_demo.py checks they agree).
"""
from __future__ import annotations

from dataclasses import dataclass

VALIDATION_SEED = 1
GRID_SIZE = 3
ORACLE = "oracle reward"

# Offline methods learn from the preference pairs; online ones sample from the policy and score the
# samples with a reward. Fixed settings first, then each method's grid of one coefficient.
FIXED = {
    "dpo": [],
    "cpo": ["loss.variant=full", "loss.margin=0.0"],
    "pmle": [],
    # seed 001 Algorithm 1 on two fresh samples per prompt, soft labels from the reward
    "online_distill": ["loss.gamma=1.0", "generation.num_samples=2"],
    "rebel": ["loss.eta=1.0", "generation.num_samples=2", "update_epochs=2"],
    "ppo": ["update_epochs=2"],
    "grpo": [],
    "reverse_kl": [],
}
# The reward model never saw a response without EOS (pi*'s support has none); every online row gets the
# same penalty for them, the oracle rows too (there it adds to the oracle's own off-support reward).
ONLINE_SHARED = ["generation.missing_eos_penalty=-2.0"]

GRID = {
    # beta of the log-ratio margin: larger keeps the policy closer to the SFT reference
    "dpo": [["loss.beta=0.1"], ["loss.beta=0.3"], ["loss.beta=1.0"]],
    "cpo": [["loss.beta=0.1"], ["loss.beta=0.3"], ["loss.beta=1.0"]],
    # PMLE (beta = 0) has no regulariser; its one coefficient is the assumed preference sharpness gamma
    "pmle": [["loss.gamma=0.5"], ["loss.gamma=1.0"], ["loss.gamma=2.0"]],
    "online_distill": [["loss.kl_coef=0.05"], ["loss.kl_coef=0.2"], ["loss.kl_coef=0.5"]],
    "rebel": [["loss.kl_coef=0.05"], ["loss.kl_coef=0.2"], ["loss.kl_coef=0.5"]],
    # RLHF's optimum is pi_sft * exp(R / beta): beta around the reward's own scale (R ~ log pi*, 1 nat)
    "ppo": [["loss.kl_coef=0.3"], ["loss.kl_coef=1.0"], ["loss.kl_coef=3.0"]],
    "grpo": [["loss.kl_coef=0.3"], ["loss.kl_coef=1.0"], ["loss.kl_coef=3.0"]],
    # reverse KL with beta + gamma = 1 targets pi_sft^beta * exp(R) (seed 001 Eq. 16): pi* itself at beta = 0
    "reverse_kl": [["loss.kl_coef=0.0", "loss.entropy_coef=1.0"], ["loss.kl_coef=0.2", "loss.entropy_coef=0.8"],
                   ["loss.kl_coef=0.5", "loss.entropy_coef=0.5"]],
}
OFFLINE_METHODS = ("dpo", "cpo", "pmle")
ONLINE_METHODS = ("online_distill", "rebel", "ppo", "reverse_kl", "grpo")
PAIRWISE_ONLINE = ("online_distill", "rebel")


@dataclass(frozen=True)
class Row:
    """One trained model of the demo: `name` in the table, the method, and which reward scores it."""

    name: str
    method: str
    reward: str          # "pairs" (offline), "model" (the learned RM) or "oracle"

    @property
    def folder(self) -> str:
        return self.name.replace(f" ({ORACLE})", "_oracle")

    @property
    def group(self) -> str:
        return {"pairs": "offline, preference pairs", "model": "online, learned reward model",
                "oracle": f"online, {ORACLE} γ log π*"}[self.reward]


def rows(methods: tuple[str, ...], oracle: bool = True) -> list[Row]:
    """The demo's rows for `methods`: offline ones once, online ones with the learned RM and (oracle=True)
    again with the oracle reward."""
    unknown = [m for m in methods if m not in FIXED]
    if unknown:
        raise ValueError(f"demo: unknown method {unknown[0]!r}; valid: {sorted(FIXED)}")
    out = [Row(m, m, "pairs") for m in methods if m in OFFLINE_METHODS]
    out += [Row(m, m, "model") for m in methods if m in ONLINE_METHODS]
    if oracle:
        out += [Row(f"{m} ({ORACLE})", m, "oracle") for m in methods if m in ONLINE_METHODS]
    return out


def row_overrides(row: Row, chosen: list[str]) -> list[str]:
    """The method-specific overrides of a row: fixed ones, the shared online ones, then the swept ones."""
    return [*FIXED[row.method], *(ONLINE_SHARED if row.reward != "pairs" else []), *chosen]


# What `distalign demo --sweep` chose on the validation seed (docs/demo_sweep_{variant}.json).
CHOSEN: dict[str, dict[str, list[str]]] = {
    "full": {
        "dpo": ["loss.beta=1.0"],
        "cpo": ["loss.beta=1.0"],
        "pmle": ["loss.gamma=1.0"],
        "online_distill": ["loss.kl_coef=0.5"],
        "rebel": ["loss.kl_coef=0.5"],
        "ppo": ["loss.kl_coef=3.0"],
        "reverse_kl": ["loss.kl_coef=0.5", "loss.entropy_coef=0.5"],
        "grpo": ["loss.kl_coef=3.0"],
        "online_distill (oracle reward)": ["loss.kl_coef=0.05"],
        "rebel (oracle reward)": ["loss.kl_coef=0.5"],
        "ppo (oracle reward)": ["loss.kl_coef=3.0"],
        "reverse_kl (oracle reward)": ["loss.kl_coef=0.0", "loss.entropy_coef=1.0"],
        "grpo (oracle reward)": ["loss.kl_coef=3.0"],
    },
    "quick": {
        "dpo": ["loss.beta=1.0"],
        "cpo": ["loss.beta=1.0"],
        "pmle": ["loss.gamma=1.0"],
        "online_distill": ["loss.kl_coef=0.2"],
        "rebel": ["loss.kl_coef=0.5"],
        "ppo": ["loss.kl_coef=3.0"],
        "reverse_kl": ["loss.kl_coef=0.5", "loss.entropy_coef=0.5"],
        "grpo": ["loss.kl_coef=3.0"],
        "online_distill (oracle reward)": ["loss.kl_coef=0.05"],
        "rebel (oracle reward)": ["loss.kl_coef=0.5"],
        "ppo (oracle reward)": ["loss.kl_coef=3.0"],
        "reverse_kl (oracle reward)": ["loss.kl_coef=0.0", "loss.entropy_coef=1.0"],
        "grpo (oracle reward)": ["loss.kl_coef=3.0"],
    },
}


def chosen_settings(variant: str, row: Row) -> list[str]:
    """The swept coefficient chosen for `row` in `variant` ('full' or 'quick'); a row the sweep has not
    covered is an error, so that the demo never reports an untuned setting silently."""
    choice = CHOSEN[variant].get(row.name)
    if choice is None:
        raise ValueError(f"demo: no swept setting for {row.name!r} ({variant}); run `distalign demo --sweep"
                         f"{' --quick' if variant == 'quick' else ''}` and record its choice in "
                         "distalign/demo/methods.py CHOSEN")
    return list(choice)


def chosen_by(variant: str) -> str:
    """One line saying where `variant`'s settings come from (the demo writes it into results.json)."""
    flag = " --quick" if variant == "quick" else ""
    return (f"`distalign demo --sweep{flag}` on validation seed {VALIDATION_SEED}: {GRID_SIZE} settings of one "
            "coefficient per row at the demo's own steps, the lowest exact KL(pi*||pi) chosen "
            f"(record: docs/demo_sweep_{variant}.json)")
