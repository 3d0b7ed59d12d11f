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


CLAIMS: list[Claim] = [
    Claim("SFT against itself reads 1/2: exactly in the exact column, within two standard errors in the "
          "sampled one.", _sft_reads_half),
]


def check_claims(results: dict) -> list[tuple[str, bool]]:
    """[(claim, whether it holds on these results)] for every claim in `CLAIMS`."""
    return [(claim.text, bool(claim.holds(results))) for claim in CLAIMS]
