"""Rule-based verifiable rewards: plain Python functions with the reward-callable signature
`fn(prompts, completions, **columns) -> list[float]` (columns are the data rows' other fields as lists).

    exact_answer(["2+3="], ["It is 5"], answer=["5"])   -> [1.0]
    regex_reward(["q"], ["<a>7</a>"], pattern=r"<a>\\d+</a>")  -> [1.0]
"""
from __future__ import annotations

import math
import re
from typing import Any

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last integer or decimal written in `text` (commas as thousands separators are ignored)."""
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return last_number(str(value)) if value is not None else None


def exact_answer(prompts: list, completions: list[str], answer: list | None = None,
                 tolerance: float = 1e-6, **_: Any) -> list[float]:
    """1.0 when the last number in the completion equals the row's `answer` (within `tolerance`), else 0.0.

    `answer` may hold numbers or strings such as "19" or "#### 19" (its last number is used).
    """
    if answer is None:
        raise ValueError("exact_answer: the data rows have no 'answer' column")
    if len(answer) != len(completions):
        raise ValueError(f"exact_answer: {len(answer)} answers for {len(completions)} completions")
    rewards = []
    for completion, expected in zip(completions, answer):
        got, want = last_number(completion), _as_number(expected)
        ok = got is not None and want is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=tolerance)
        rewards.append(1.0 if ok else 0.0)
    return rewards


def regex_reward(prompts: list, completions: list[str], pattern: str = "", full_match: bool = False,
                 **_: Any) -> list[float]:
    """1.0 when the completion matches `pattern` (re.search, or re.fullmatch with `full_match`), else 0.0."""
    if not pattern:
        raise ValueError("regex_reward: 'pattern' is empty")
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full_match else compiled.search
    return [1.0 if match(c) else 0.0 for c in completions]
