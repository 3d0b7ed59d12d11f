"""MT-Bench-style single-answer grading: the judge scores one response from 1 to 10.

Prompt and answer format follow MT-Bench's "single-v1" judge (Zheng et al. 2023, "Judging
LLM-as-a-judge with MT-Bench and Chatbot Arena"; seed 001 Table 7 reports it): the judge explains,
then writes "Rating: [[7]]". An answer without a readable rating in [1, 10] is re-asked and then
counted as invalid. This grades single-turn prompts; MT-Bench's second turn is a second call with
the first exchange in the prompt, which the caller can build into `prompt`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .judge import JudgeClient
from .metrics import mean_stderr

SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_USER = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
    "by an AI assistant to the user question displayed below. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the "
    "response. Begin your evaluation by providing a short explanation. Be as objective as possible. "
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    'following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
    "[Question]\n{prompt}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
_DOUBLE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_LABELLED = re.compile(r"rating\s*:\s*\[?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(text: str) -> float | None:
    """The 1-10 score in a judge answer ("Rating: [[7]]", "[[7.5]]", "Rating: 7"); None if absent or
    out of range. The last "[[n]]" wins, as in MT-Bench, since the instructions quote "[[5]]"."""
    matches = _DOUBLE.findall(text) or _LABELLED.findall(text)
    if not matches:
        return None
    score = float(matches[-1])
    return score if 1.0 <= score <= 10.0 else None


def single_messages(prompt: str, answer: str) -> list[dict]:
    """The chat messages asking the judge to grade `answer` to `prompt`."""
    return [{"role": "system", "content": SINGLE_SYSTEM},
            {"role": "user", "content": SINGLE_USER.format(prompt=prompt, answer=answer)}]


@dataclass
class SingleGrades:
    """Scores per response (None = invalid) and their summary over the valid ones."""

    scores: list[float | None] = field(default_factory=list)

    @property
    def valid(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    def summary(self) -> dict:
        """mean, stderr (sample std / sqrt(n); NaN for n < 2), n valid, n invalid."""
        mean, stderr = mean_stderr(self.valid)
        return {"mean": mean, "stderr": stderr, "n": len(self.valid),
                "invalid": len(self.scores) - len(self.valid)}


def grade_single(client: JudgeClient, prompts: Sequence[str], answers: Sequence[str]) -> SingleGrades:
    """Ask the judge for a 1-10 rating of each (prompt, answer), concurrently and through the cache."""
    if len(prompts) != len(answers):
        raise ValueError(f"grade_single: {len(prompts)} prompts but {len(answers)} answers")
    scores = client.map(lambda job: client.ask(single_messages(*job), parse_rating, "single"),
                        list(zip(prompts, answers)))
    return SingleGrades(scores=scores)
