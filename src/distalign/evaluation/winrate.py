"""Win-rate of policy responses against reference responses, with a pluggable judge.

Each pair i gets a score w_i in [0, 1] for *ours* beating *theirs*; the win-rate is the mean
W = (1/n) sum_i w_i and its standard error sqrt(s^2 / n) with s^2 the sample variance of the w_i.
- oracle: w_i = P*(ours > theirs | x_i), the testbed's exact preference probability (seed 001 Eq. 2:
  sigmoid(gamma * (log pi*(a|x) - log pi*(b|x)))). Using the probability rather than a sampled label
  gives the expected win-rate with no label noise (AlpacaEval does the same with its judge's p).
- reward model: w_i = 1 if R(x, ours) > R(x, theirs), 0 if lower, 1/2 if equal.
- LLM judge: both orders asked (see `judge.judge_pairs`); w = 1 win, 0 loss, 1/2 tie; invalid pairs
  are left out of W and counted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .judge import JudgeClient, judge_pairs
from .metrics import mean_stderr

OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


@dataclass(frozen=True)
class WinRate:
    """W with ties counted half, its standard error, and the counts behind it."""

    rate: float
    stderr: float
    n: int          # pairs that count (invalid ones excluded)
    wins: int
    ties: int
    losses: int
    invalid: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def winrate_from_scores(scores: Sequence[float], invalid: int = 0) -> WinRate:
    """W from per-pair scores in [0, 1]: > 1/2 counts a win, = 1/2 a tie, < 1/2 a loss."""
    for i, score in enumerate(scores):
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"win-rate: pair {i}: score {score} is outside [0, 1]")
    rate, stderr = mean_stderr(scores)
    return WinRate(rate=rate, stderr=stderr, n=len(scores), wins=sum(s > 0.5 for s in scores),
                   ties=sum(s == 0.5 for s in scores), losses=sum(s < 0.5 for s in scores),
                   invalid=invalid)


def winrate_from_outcomes(outcomes: Sequence[str]) -> WinRate:
    """W from 'win' / 'tie' / 'loss' / 'invalid' labels."""
    unknown = set(outcomes) - set(OUTCOME_SCORE) - {"invalid"}
    if unknown:
        raise ValueError(f"win-rate: unknown outcomes {sorted(unknown)}")
    scores = [OUTCOME_SCORE[o] for o in outcomes if o != "invalid"]
    return winrate_from_scores(scores, invalid=sum(o == "invalid" for o in outcomes))


def _check_lengths(prompts: Sequence, ours: Sequence, theirs: Sequence) -> None:
    if not len(prompts) == len(ours) == len(theirs):
        raise ValueError(f"win-rate: lengths differ: {len(prompts)} prompts, {len(ours)} policy "
                         f"responses, {len(theirs)} reference responses")


def oracle_winrate(prompts: Sequence[str], ours: Sequence[str], theirs: Sequence[str],
                   prob_a_beats_b: Callable[[str, str, str], float]) -> WinRate:
    """W with w_i = prob_a_beats_b(x_i, ours_i, theirs_i), the exact P*(ours > theirs | x)."""
    _check_lengths(prompts, ours, theirs)
    return winrate_from_scores([float(prob_a_beats_b(x, a, b)) for x, a, b in zip(prompts, ours, theirs)])


def reward_winrate(prompts: Sequence[str], ours: Sequence[str], theirs: Sequence[str],
                   reward_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]]) -> WinRate:
    """W by a reward model: `reward_fn(prompts, responses)` scores a batch; higher wins, equal ties.

    `metrics.reward_scores` bound to a model and tokenizer (functools.partial) is such a function.
    """
    _check_lengths(prompts, ours, theirs)
    return winrate_from_rewards(reward_fn(prompts, ours), reward_fn(prompts, theirs))


def winrate_from_rewards(ours_rewards: Sequence[float], theirs_rewards: Sequence[float]) -> WinRate:
    """W from already computed rewards of both sides: w_i = 1 if higher, 0 if lower, 1/2 if equal."""
    if len(ours_rewards) != len(theirs_rewards):
        raise ValueError(f"win-rate: {len(ours_rewards)} policy rewards but {len(theirs_rewards)} reference rewards")
    return winrate_from_scores([1.0 if r > q else 0.0 if r < q else 0.5
                                for r, q in zip(ours_rewards, theirs_rewards)])


def judge_winrate(prompts: Sequence[str], ours: Sequence[str], theirs: Sequence[str],
                  client: JudgeClient) -> WinRate:
    """W by an LLM judge, each pair asked in both orders so that position bias cancels."""
    _check_lengths(prompts, ours, theirs)
    return winrate_from_outcomes(judge_pairs(client, prompts, ours, theirs))
