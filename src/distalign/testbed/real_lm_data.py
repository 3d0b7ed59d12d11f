"""Data of the real-model world (`real_lm`): a cached pool of pi0 pairs with both models' exact
log-probs, preference labels with the misspecification switches, pi* demonstrations, the files the
trainers read, and the oracle reward.

    pool = build_pool(world, questions, n=4000, path=out / "pool.jsonl", seed=0)   # resumable, cached
    rows = label_pairs(pool, gamma=0.1, seed=0, label_gamma=None, label_noise=0.0)
    write_pair_files(rows[:1000], out / "pairs-1000.jsonl", out / "rm-pairs-1000.jsonl")

Pairs follow seed 001 Eq. 2: a, b ~ pi0(.|x) independently at temperature 1 (full support), a is
chosen with probability sigmoid(gamma' (log pi*(a|x) - log pi*(b|x))), then flipped with probability
`label_noise`; gamma' = gamma unless `label_gamma` says otherwise (as the tabular world's switches).
Pair i's prompt is the (i mod m)-th of a fresh permutation of the m training prompts per pass, so
every prompt is used equally often and a prefix of the pool is a smaller data set of the same kind
(the rate experiment's n = 250, 1000, 4000 are nested prefixes).
Policy training files carry each response's exact token ids (`chosen_ids`, ...: the data layer uses
them verbatim, so a response cut at L keeps no EOS); the reward model's file carries text only,
because the reward model is scored on text everywhere (`models.reward_scores` appends EOS).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from .lm_data import write_jsonl
from .real_lm import RealLMWorld, user_messages

POOL_CHUNK = 32     # pairs sampled and scored together; the pool file grows by whole chunks


def pass_order(questions: list[str], n: int, seed: int) -> list[str]:
    """n prompts: consecutive passes over `questions`, each in a fresh permutation seeded by (seed, pass)."""
    out: list[str] = []
    for epoch in range(math.ceil(n / len(questions))):
        order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(10_007 * seed + epoch))
        out += [questions[i] for i in order.tolist()]
    return out[:n]


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a last line cut short by an interrupted write is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _pool_chunk(world: RealLMWorld, questions: list[str], seed: int) -> list[dict]:
    """Two pi0 samples per question (rows [q, q, ...] share a prefill) and their four exact log-probs
    (pi0's from the sampler itself, pi*'s from one shared-prompt forward per pair)."""
    drawn, own = world.sample_scored([q for q in questions for _ in range(2)], "reference", seed)
    a, b, ref_a, ref_b = drawn[0::2], drawn[1::2], own[0::2].clone(), own[1::2].clone()
    for i in range(len(a)):
        redraw = 0
        while a[i] == b[i]:         # equal responses carry no preference; redraw b alone (rare at T = 1)
            redraw += 1
            fresh, fresh_logp = world.sample_scored([questions[i]], "reference", seed * 7919 + 1000 * i + redraw)
            b[i], ref_b[i] = fresh[0], fresh_logp[0]
    star_a, star_b = world.pair_logps(questions, a, b, "target")
    return [{"question": q, "a_ids": x, "b_ids": y, "star_a": float(sa), "star_b": float(sb),
             "ref_a": float(ra), "ref_b": float(rb)}
            for q, x, y, sa, sb, ra, rb in zip(questions, a, b, star_a, star_b, ref_a, ref_b)]


def build_pool(world: RealLMWorld, questions: list[str], n: int, path: Path, seed: int, progress=None) -> list[dict]:
    """The first n pairs of the pool at `path`, sampling only what the file does not hold yet.

    Rows are drawn in chunks of `POOL_CHUNK`, the chunk starting at row i with seed (seed, i) and
    appended in one write, so an interrupted build continues where it stopped (as if it had not
    stopped) and a longer pool extends a shorter one with the same first rows."""
    path = Path(path)
    rows = _read_jsonl(path)
    order = pass_order(questions, max(n, len(rows)), seed)
    if path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) != len(rows):
        write_jsonl(path, rows)                                 # without the torn last line
    if progress is not None:
        progress.update(min(len(rows), n))
    while len(rows) < n:
        start = len(rows)
        fresh = _pool_chunk(world, order[start:min(n, start + POOL_CHUNK)], 1_000_003 * seed + start)
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in fresh)
        rows += fresh
        if progress is not None:
            progress.update(len(fresh))
    return rows[:n]


def label_pairs(pool: list[dict], gamma: float, seed: int, label_gamma: float | None = None,
                label_noise: float = 0.0) -> list[dict]:
    """Each pool row oriented into chosen / rejected by a label drawn from the (possibly misspecified)
    preference model; `p_star` keeps the true P*(a > b) = sigmoid(gamma (log pi*(a) - log pi*(b)))."""
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise: expected a probability in [0, 1], found {label_noise}")
    margin = torch.tensor([r["star_a"] - r["star_b"] for r in pool], dtype=torch.float64)
    p_star = torch.sigmoid(gamma * margin)
    p_label = torch.sigmoid((gamma if label_gamma is None else label_gamma) * margin)
    p_label = (1 - label_noise) * p_label + label_noise * (1 - p_label)
    a_wins = torch.rand(len(pool), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < p_label
    rows = []
    for r, win, p in zip(pool, a_wins.tolist(), p_star.tolist()):
        first, second = ("a", "b") if win else ("b", "a")
        rows.append({"question": r["question"], "chosen_ids": r[f"{first}_ids"], "rejected_ids": r[f"{second}_ids"],
                     "star_chosen": r[f"star_{first}"], "star_rejected": r[f"star_{second}"],
                     "ref_chosen": r[f"ref_{first}"], "ref_rejected": r[f"ref_{second}"],
                     "p_star_chosen": p if win else 1 - p})
    return rows


def label_statistics(rows: list[dict], gamma: float) -> dict:
    """How informative the labels are: share of pairs with P* in [0.1, 0.9], mean label entropy
    H(P*) in nats (log 2 = 0.693 is a coin flip, 0 a deterministic label), the median |margin| under
    pi*, and the share of labels that agree with the pi*-likelier response."""
    margin = torch.tensor([r["star_chosen"] - r["star_rejected"] for r in rows], dtype=torch.float64)
    p = torch.sigmoid(gamma * margin).clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    return {"n": len(rows), "gamma": gamma, "share_informative": float(((p >= 0.1) & (p <= 0.9)).double().mean()),
            "label_entropy_nats": float(entropy.mean()), "median_abs_margin": float(margin.abs().quantile(0.5)),
            "share_agreeing_with_pi_star": float((margin > 0).double().mean())}


def pair_records(world: RealLMWorld, rows: list[dict], with_ids: bool = True) -> list[dict]:
    """JSONL rows {prompt (chat messages as pi0 sees them), chosen, rejected[, chosen_ids, rejected_ids]}."""
    chosen, rejected = world.decode([r["chosen_ids"] for r in rows]), world.decode([r["rejected_ids"] for r in rows])
    out = []
    for r, c, j in zip(rows, chosen, rejected):
        row = {"prompt": user_messages(r["question"]), "chosen": c or " ", "rejected": j or " "}
        if with_ids:
            row.update(chosen_ids=r["chosen_ids"], rejected_ids=r["rejected_ids"])
        if row["chosen"] == row["rejected"]:   # different ids, same text: the text-only file tells them apart
            row["rejected"] += " "
        out.append(row)
    return out


def write_pair_files(world: RealLMWorld, rows: list[dict], policy_path: Path, reward_path: Path) -> None:
    """The policy methods' pairs (exact ids) and the reward model's (text only) for the same rows."""
    write_jsonl(policy_path, pair_records(world, rows, with_ids=True))
    write_jsonl(reward_path, pair_records(world, rows, with_ids=False))


def demonstration_rows(world: RealLMWorld, questions: list[str], seed: int) -> list[dict]:
    """SFT data: one y ~ pi* per question, written as pi0's prompt (the policy never sees S)."""
    responses = world.sample(questions, "target", seed)
    return [{"prompt": user_messages(q), "completion": t or " ", "completion_ids": y}
            for q, y, t in zip(questions, responses, world.decode(responses))]


def prompt_rows(questions: list[str]) -> list[dict]:
    """Online methods' prompts; `question` reaches the oracle reward (it renders pi*'s prompt from it)."""
    return [{"prompt": user_messages(q), "question": q} for q in questions]


# -- the oracle reward ----------------------------------------------------------------------------
_WORLDS: dict[tuple, RealLMWorld] = {}


def share_world(world: RealLMWorld) -> None:
    """Let `oracle_reward` calls in this process score with `world` (its frozen model) instead of
    loading a second copy of the same weights."""
    _WORLDS[(world.model_dir, world.system_prompt, world.max_new_tokens, world.gamma)] = world


def oracle_reward(prompts: list[str], completions: list[str], question: list[str], *, model_dir: str,
                  system_prompt: str, max_new_tokens: int, gamma: float, **columns) -> list[float]:
    """R(x, y) = gamma log pi*(y|x), exactly: the population minimiser of the reward model's
    Bradley-Terry loss on these labels (up to a constant per prompt), so an oracle row is the
    learned-RM row with infinitely many pairs.

    A reward source sees text; the completion's ids are recovered by re-tokenising it, and it ended
    with EOS exactly when it holds fewer than L tokens (a sample stops at EOS or after L tokens).
    The few texts that re-tokenise differently from the sampled ids are scored as re-tokenised.
    """
    key = (str(model_dir), system_prompt, max_new_tokens, gamma)
    if key not in _WORLDS:
        _WORLDS[key] = RealLMWorld.load(model_dir, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                                        gamma=gamma)
    world = _WORLDS[key]
    ids = [world.tokenizer(t, add_special_tokens=False)["input_ids"] for t in completions]
    ids = [y[:max_new_tokens] if len(y) >= max_new_tokens else y + [world.eos] for y in ids]
    return (gamma * world.logps(list(question), ids, "target")).tolist()


def as_tensor(rows: list[dict], key: str) -> Tensor:
    return torch.tensor([r[key] for r in rows], dtype=torch.float64)
