"""The demo's claims: each README sentence about the results, with the check that makes it true.

The README's narrative lists exactly these sentences; tests/test_demo.py checks every one on the quick
run's results and on the full run's (docs/demo_results.json), and that the README still says them, so
the text cannot go stale silently. The report of each run says which hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KL = "kl_target_to_policy"
ORACLE = " (oracle reward)"


@dataclass(frozen=True)
class Claim:
    text: str
    holds: Callable[[dict], bool]


def _kl(results: dict, name: str) -> float:
    return results[name][KL]


def _closer_than_sft(*names: str) -> Callable[[dict], bool]:
    return lambda r: all(_kl(r, n) < _kl(r, "sft") for n in names)


def _sft_reads_half(results: dict) -> bool:
    row = results["sft"]
    return abs(row["win_rate_exact"] - 0.5) < 1e-6 and abs(row["win_rate_vs_sft"] - 0.5) <= 2 * row[
        "win_rate_vs_sft_stderr"]


RLHF_STYLE = ("ppo", "grpo", "rebel")
DISTRIBUTION_LEARNING = ("pmle", "online_distill", "reverse_kl")


def _both_rewards(*methods: str) -> tuple[str, ...]:
    return tuple(name for m in methods for name in (m, m + ORACLE))


def _top_winner_is_sharper(results: dict) -> bool:
    """The row with the highest exact win-rate against SFT is RLHF-style or DPO / CPO, and further from pi*."""
    rows = {k: v for k, v in results.items() if not k.startswith("_") and k not in ("sft", "pi* (target)")}
    top = max(rows, key=lambda k: rows[k]["win_rate_exact"])
    return top.split(" (")[0] in (*RLHF_STYLE, "dpo", "cpo") and rows[top][KL] > _kl(results, "sft")


CLAIMS: list[Claim] = [
    Claim("SFT against itself reads 1/2: exactly in the exact column, within two standard errors in the "
          "sampled one.", _sft_reads_half),
    Claim("PMLE, and online preference distillation and reverse KL with the learned reward model, end closer "
          "to π* than the SFT start in exact KL(π*‖π).", _closer_than_sft("pmle", "online_distill", "reverse_kl")),
    Claim("Reverse KL with the oracle reward and β = 0, whose optimum is π* itself, ends closer to π* than "
          "the SFT start.", _closer_than_sft("reverse_kl" + ORACLE)),
    Claim("PPO, GRPO and REBEL end further from π* than the SFT start with either reward, and so do DPO and "
          "CPO: their optimum π_sft·exp(R/β) is not π* for any β.",
          lambda r: all(_kl(r, n) > _kl(r, "sft") for n in (*_both_rewards(*RLHF_STYLE), "dpo", "cpo"))),
    Claim("Every distribution-learning row (PMLE, preference distillation, reverse KL, either reward) is closer "
          "to π* than every RLHF-style or DPO / CPO row.",
          lambda r: max(_kl(r, n) for n in (*_both_rewards(*DISTRIBUTION_LEARNING[1:]), "pmle")) < min(
              _kl(r, n) for n in (*_both_rewards(*RLHF_STYLE), "dpo", "cpo"))),
    Claim("The row that wins most often against SFT under the exact oracle is an RLHF-style or DPO / CPO row "
          "that is further from π* than SFT: the oracle's win-rate rewards sharpening, not closeness to π*.",
          _top_winner_is_sharper),
    Claim("No distribution-learning row wins against SFT as often as π* itself does: after these short runs "
          "they are nearer to π* than SFT is, not at it.",
          lambda r: all(r[n]["win_rate_exact"] < r["pi* (target)"]["win_rate_exact"]
                        for n in (*_both_rewards(*DISTRIBUTION_LEARNING[1:]), "pmle"))),
]


def _reverse_kl_needs_its_anchor(record: dict) -> bool:
    learned, oracle = record["rows"]["reverse_kl"], record["rows"]["reverse_kl" + ORACLE]
    zero = [p for p in learned["grid"] if "loss.kl_coef=0.0" in p["settings"]][0]
    return (all(zero["off_support_mass"] > p["off_support_mass"] for p in learned["grid"] if p is not zero)
            and "loss.kl_coef=0.0" in oracle["chosen"])


# Sentences about the sweeps, checked on their records (docs/demo_sweep_{full,quick}.json).
SWEEP_CLAIMS: list[Claim] = [
    Claim("In both sweeps, reverse KL with the learned reward model put the most mass off π*'s support at "
          "β = 0, where the reward model extrapolates, while with the oracle reward β = 0 was the best setting.",
          _reverse_kl_needs_its_anchor),
]


def check_claims(results: dict, claims: list[Claim] | None = None) -> list[tuple[str, bool | None]]:
    """[(claim, True / False, or None where the run lacks a row the claim is about)] for every claim in
    `claims` (default `CLAIMS`)."""
    checked = []
    for claim in CLAIMS if claims is None else claims:
        try:
            checked.append((claim.text, bool(claim.holds(results))))
        except KeyError:                 # a run with fewer methods (DemoSettings.methods)
            checked.append((claim.text, None))
    return checked
