"""The methods of `testbed real-lm`, each one run of the library's own trainer from a config.

Every method starts from M with a fresh LoRA adapter (so it starts exactly at pi0), sees the same
training prompts, and spends the same budget: n preference pairs (2n pi0 responses), or n prompt
draws x 2 fresh samples for the online methods (k = 4 with n/2 draws for GRPO), or n pi* samples
for SFT. The objective's own coefficients are fixed before any run (seed 001 Table 5 where it has
them, the world's gamma where a method must match it); only the learning rate is chosen, on the
validation split (`real_lm.choose_learning_rate`). Where each method's population optimum lies,
with the oracle reward R = gamma log pi* (learned-RM rows estimate the same R up to a per-prompt constant):
- sft:                     pi*                          (maximum likelihood on pi* samples)
- dpo  (beta = gamma):     pi0 * pi*   (normalised)     (seed 001 Eq. 6: the reference stays in the optimum)
- cpo  (beta = gamma):     constrained DPO (seed 003); same as DPO where the constraint is inactive
- pmle (gamma, +0.01 KL):  pi* as the KL weight -> 0     (Eq. 5)
- online_distill:          pi* as kl_coef -> 0           (Algorithm 1, Eq. 11-12; gamma 0.1, kl 0.05)
- rebel (eta 1, kl 0.05):  pi0 * pi*^(gamma / kl) = pi0 pi*^2   (the RLHF optimum, reached by regression)
- ppo   (kl 0.05):         pi0 * pi*^2                   (Eq. 1)
- reverse_kl paper (kl 0.05, entropy 0.01): pi0^(5/6) * pi*^(5/3)  (Eq. 16 at Table 5's coefficients)
- reverse_kl target (kl 0, entropy gamma):  pi*          (Eq. 16 with beta = 0, entropy = gamma)
- grpo  (kl 0.05, k3):     group-normalised advantages: no closed form; sharpens toward R's mode
"""
from __future__ import annotations

from dataclasses import dataclass, field

OFFLINE, ONLINE, ONLINE_PAIRWISE = "offline", "online", "online_pairwise"


@dataclass(frozen=True)
class MethodSpec:
    name: str                       # row name in the table
    method: str                     # distalign method
    family: str                     # which trainer runs it
    data: str                       # "pairs" | "demos" | "rm_pairs" | "prompts"
    settings: tuple[str, ...] = ()  # the objective's fixed key=value overrides
    reward: str | None = None       # None | "rm" | "oracle"
    samples_per_prompt: int = 2     # online: fresh samples per prompt draw
    lr_grid: tuple[float, ...] = field(default=(1e-4, 3e-4))
    pair: str = ""                  # the Table 2 pair it belongs to, for the report

    @property
    def uses_reward_model(self) -> bool:
        return self.reward == "rm"


def _online(name: str, method: str, family: str, settings: tuple[str, ...], reward: str, pair: str,
            k: int = 2) -> MethodSpec:
    return MethodSpec(f"{name} ({'oracle' if reward == 'oracle' else 'RM'})", method, family, "prompts", settings,
                      reward, k, (3e-4, 1e-4), pair)


# Run and table order: the reference row, then Table 2's three pairs with the learned reward model (the
# paper's setting), the same with the oracle reward, then the rows outside Table 2; so a run stopped
# part-way has whole pairs measured first.
ORDER = ("sft on pi*", "pmle", "dpo",
         "distillation (RM)", "rebel (RM)", "reverse kl paper (RM)", "rlhf ppo (RM)",
         "distillation (oracle)", "rebel (oracle)", "reverse kl target (oracle)", "rlhf ppo (oracle)",
         "reverse kl paper (oracle)", "reverse kl target (RM)", "cpo", "grpo (RM)", "grpo (oracle)")


def method_specs(gamma: float) -> list[MethodSpec]:
    """Every row, in run order (`ORDER`); `gamma` is the world's (the labels' sharpness)."""
    specs = [
        MethodSpec("sft on pi*", "sft", OFFLINE, "demos", (), None, 1, (2e-4, 5e-4), "reference"),
        MethodSpec("dpo", "dpo", OFFLINE, "pairs", (f"loss.beta={gamma}",), None, 1, (2e-4, 5e-4), "pmle vs dpo"),
        MethodSpec("cpo", "cpo", OFFLINE, "pairs", (f"loss.beta={gamma}", "loss.variant=full"), None, 1,
                   (2e-4, 5e-4), "pmle vs dpo"),
        MethodSpec("pmle", "pmle_online", ONLINE_PAIRWISE, "pairs", (f"loss.gamma={gamma}", "loss.kl_coef=0.01"),
                   None, 2, (2e-4, 5e-4), "pmle vs dpo"),
    ]
    for reward in ("rm", "oracle"):
        specs += [
            _online("distillation", "online_distill", ONLINE_PAIRWISE,
                    (f"loss.gamma={gamma}", "loss.kl_coef=0.05", "update_epochs=2"), reward, "distillation vs rebel"),
            _online("rebel", "rebel", ONLINE_PAIRWISE, ("loss.eta=1.0", "loss.kl_coef=0.05", "update_epochs=2"),
                    reward, "distillation vs rebel"),
            _online("rlhf ppo", "ppo", ONLINE, ("loss.kl_coef=0.05", "update_epochs=2"), reward,
                    "reverse kl vs rlhf"),
            _online("reverse kl paper", "reverse_kl", ONLINE, ("loss.kl_coef=0.05", "loss.entropy_coef=0.01"),
                    reward, "reverse kl vs rlhf"),
            _online("reverse kl target", "reverse_kl", ONLINE, ("loss.kl_coef=0.0", f"loss.entropy_coef={gamma}"),
                    reward, "reverse kl vs rlhf"),
            _online("grpo", "grpo", ONLINE, ("loss.kl_coef=0.05",), reward, "other", k=4),
        ]
    by_name = {s.name: s for s in specs}
    assert sorted(by_name) == sorted(ORDER), "ORDER lists every row once"
    return [by_name[name] for name in ORDER]


def spec_by_name(specs: list[MethodSpec], names: list[str] | None) -> list[MethodSpec]:
    """The specs whose row name or distalign method is in `names` (all when None)."""
    if not names:
        return specs
    known = {s.name for s in specs} | {s.method for s in specs}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; valid: {', '.join(s.name for s in specs)} "
                         f"(or a method name: {', '.join(sorted({s.method for s in specs}))})")
    return [s for s in specs if s.name in names or s.method in names]


def slug(name: str) -> str:
    """A folder name for a row name."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
