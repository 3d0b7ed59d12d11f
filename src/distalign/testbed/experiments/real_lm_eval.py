"""Metrics of one policy in the real-model world, on held-out prompts, each with its standard error.

    shared = EvalSet.build(world, test_questions, per_prompt=2, seed=0, rm=rm_folder)   # once per run
    row = evaluate_policy(world, shared, policy, seed=1)                              # per method

- exact KL(pi*||pi): Monte Carlo over y ~ pi* (the shared target samples), log pi*(y) - log pi(y), both
  exact, so the estimate is unbiased; KL(pi||pi*) likewise on the policy's own samples;
- KL(pi||pi0) on the policy's own samples (k1, the exact per-sample log-ratio);
- win-rate against pi0's samples at the same prompts, judged by the exact oracle
  P*(a > b) = sigmoid(gamma (log pi*(a) - log pi*(b))), asked in both orders; the oracle has no
  position bias, so the two orders agree to rounding (their largest difference is recorded);
- the reward model's score, and the share of responses in French (`is_french`, a readout a person can check).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from distalign.data.files import write_text_atomic
from distalign.evaluation import mean_stderr, reward_scores
from distalign.models import load_reward_model

from ..real_lm import RealLMWorld, mc_kl

FRENCH_WORDS = frozenset("le la les de est une un des du et pour dans qui que sur avec sont ce cette il elle nous "
                         "vous pas plus par au aux à être très mais ou où donc leur".split())
ENGLISH_WORDS = frozenset("the is a an of and to in for that it with are this on as be by you can which or".split())
_WORD = re.compile(r"[a-zà-ÿ]+", re.IGNORECASE)
TARGET_LOGPS = "logp_on_target_samples"     # per row: log pi(y_i) of the shared pi* samples, for paired differences


def is_french(text: str) -> bool:
    """More French than English function words, and at least two of them: a check a reader can redo."""
    words = [w.lower() for w in _WORD.findall(text)]
    french = sum(w in FRENCH_WORDS for w in words)
    return french >= 2 and french > sum(w in ENGLISH_WORDS for w in words)


def french_share(texts: list[str]) -> tuple[float, float]:
    """Share of responses in French (`is_french`) and its standard error."""
    return mean_stderr([1.0 if is_french(t) else 0.0 for t in texts])


@dataclass
class EvalSet:
    """What every policy is compared on: test prompts, pi*'s samples there, pi0's samples there."""
    questions: list[str]                 # one entry per evaluation sample (each test prompt repeated)
    target: list[list[int]]              # y ~ pi*
    target_star: Tensor                  # log pi*(y), y ~ pi*
    baseline: list[list[int]]            # y0 ~ pi0, the win-rate opponent
    baseline_star: Tensor                # log pi*(y0)
    rm: str | None = None                # the reward model's folder, loaded only while it scores

    @contextlib.contextmanager
    def reward_model(self):
        """The reward model for the length of a `with` block (None without one): the experiment does not
        hold a copy of its weights while methods train."""
        yield None if self.rm is None else load_reward_model(self.rm).eval().requires_grad_(False)

    @classmethod
    def build(cls, world: RealLMWorld, questions: list[str], per_prompt: int, seed: int, rm=None,
              progress=None) -> EvalSet:
        """pi*'s samples, pi0's samples, pi*'s log-probs of pi0's: `progress` (a bar of 3) after each."""
        step = progress.update if progress is not None else lambda n: None
        rows = [q for q in questions for _ in range(per_prompt)]
        target, target_star = world.sample_scored(rows, "target", seed)
        step(1)
        baseline = world.sample(rows, "reference", seed + 1)
        step(1)
        baseline_star = world.logps(rows, baseline, "target")
        step(1)
        return cls(rows, target, target_star, baseline, baseline_star, rm)

    @classmethod
    def cached(cls, path: Path, world: RealLMWorld, questions: list[str], per_prompt: int, seed: int,
               progress=None) -> EvalSet:
        """`build` once; later calls (a resumed run) read the samples and log-probs back from `path`."""
        path = Path(path)
        if path.is_file():
            data = json.loads(path.read_text())
            if data["questions"] == [q for q in questions for _ in range(per_prompt)] and data["seed"] == seed:
                if progress is not None:
                    progress.update(3)
                return cls(data["questions"], data["target"], torch.tensor(data["target_star"], dtype=torch.float64),
                           data["baseline"], torch.tensor(data["baseline_star"], dtype=torch.float64))
        built = cls.build(world, questions, per_prompt, seed, progress=progress)
        record = {"questions": built.questions, "seed": seed, "target": built.target,
                  "target_star": built.target_star.tolist(), "baseline": built.baseline,
                  "baseline_star": built.baseline_star.tolist()}
        write_text_atomic(path, json.dumps(record))
        return built


def _winrate(world: RealLMWorld, ours: Tensor, theirs: Tensor) -> dict:
    forward = world.preference(ours, theirs)                 # P*(ours > theirs)
    backward = 1.0 - world.preference(theirs, ours)          # 1 - P*(theirs > ours), the other order
    both = (forward + backward) / 2
    mean, err = mean_stderr(both.tolist())
    return {"win_rate": mean, "win_rate_stderr": err, "order_gap": float((forward - backward).abs().max())}


def _kl_entry(name: str, values: tuple[float, float]) -> dict:
    return {name: values[0], f"{name}_stderr": values[1]}


def evaluate_policy(world: RealLMWorld, shared: EvalSet, policy=None, seed: int = 0, tokenizer=None) -> dict:
    """Every metric of `policy` (an LM prompted like pi0; None = pi0 itself). The row "pi*" is
    `evaluate_target`."""
    rows = shared.questions
    own, pi_own = world.sample_scored(rows, "reference", seed, model=policy)
    pi_on_target = target_sample_logps(world, shared, policy)
    zero_own = pi_own if policy is None else world.logps(rows, own, "reference")
    star_own = world.logps(rows, own, "target")
    row = _row(world, shared, own, mc_kl(shared.target_star, pi_on_target), pi_own, zero_own, star_own)
    return {**row, TARGET_LOGPS: pi_on_target.tolist()}


def target_sample_logps(world: RealLMWorld, shared: EvalSet, policy=None) -> Tensor:
    """log pi(y) of the set's pi* samples (one scoring forward; policy None = pi0): KL(pi*||pi) is
    `mc_kl(shared.target_star, this)`, and `evaluate_policy` keeps it per row for paired differences."""
    return world.logps(shared.questions, shared.target, "reference", model=policy)


def paired_kl_difference(a: dict, b: dict) -> tuple[float, float] | None:
    """KL(pi*||pi_a) - KL(pi*||pi_b) = E_{y ~ pi*}[log pi_b(y) - log pi_a(y)] on the same pi* samples, with
    the standard error of that per-sample difference (the rows' own errors share most of their variance:
    every row is scored on the same samples). None unless both rows hold their per-sample log-probs."""
    la, lb = a.get(TARGET_LOGPS), b.get(TARGET_LOGPS)
    if la is None or lb is None or len(la) != len(lb):
        return None
    return mean_stderr([y - x for x, y in zip(la, lb)])


def evaluate_target(world: RealLMWorld, shared: EvalSet, seed: int) -> dict:
    """The same metrics for pi* itself (KL(pi*||pi*) = 0 by construction; its own fresh samples)."""
    rows = shared.questions
    own, star_own = world.sample_scored(rows, "target", seed)
    row = _row(world, shared, own, (0.0, 0.0), star_own, world.logps(rows, own, "reference"), star_own)
    return {**row, TARGET_LOGPS: shared.target_star.tolist()}


def _row(world, shared: EvalSet, own, kl_target: tuple, pi_own: Tensor, zero_own: Tensor, star_own: Tensor) -> dict:
    texts = world.decode(own)
    row = {**_kl_entry("kl_target_to_policy", kl_target), **_kl_entry("kl_policy_to_ref", mc_kl(pi_own, zero_own)),
           **_kl_entry("kl_policy_to_target", mc_kl(pi_own, star_own)),
           **_winrate(world, star_own, shared.baseline_star)}
    row["french_share"], row["french_share_stderr"] = french_share(texts)
    row["truncated_share"] = sum(world.truncated(own)) / len(own)
    row["mean_length"] = sum(len(y) for y in own) / len(own)
    with shared.reward_model() as rm:
        if rm is not None:
            scores = reward_scores(rm, world.tokenizer, [world.messages(q, "reference") for q in shared.questions],
                                   texts, batch_size=world.batch_size)
            row["rm_score"], row["rm_score_stderr"] = mean_stderr(scores)
    row["samples"] = [{"prompt": q, "response": t} for q, t in zip(shared.questions[::_stride(shared)], texts[::_stride(shared)])][:3]
    row["n"] = len(own)
    return row


def _stride(shared: EvalSet) -> int:
    """Sample responses for the report come from three different prompts."""
    repeats = len(shared.questions) // max(1, len(dict.fromkeys(shared.questions)))
    return max(1, repeats)


def reward_model_accuracy(world: RealLMWorld, shared: EvalSet) -> dict:
    """Share of held-out (pi*, pi0) sample pairs at the same prompt where the reward model ranks the
    pi*-likelier response higher (a pairwise accuracy against the exact truth)."""
    prompts = [world.messages(q, "reference") for q in shared.questions]
    with shared.reward_model() as rm:
        a = reward_scores(rm, world.tokenizer, prompts, world.decode(shared.target), batch_size=world.batch_size)
        b = reward_scores(rm, world.tokenizer, prompts, world.decode(shared.baseline), batch_size=world.batch_size)
    truth = (shared.target_star > shared.baseline_star).tolist()
    hits = [1.0 if (x > y) == t else 0.0 for x, y, t in zip(a, b, truth)]
    mean, err = mean_stderr(hits)
    return {"accuracy": mean, "stderr": err, "n": len(hits)}
