"""Text datasets and oracles of a synthetic-language world (`lm.LMWorld`).

    rows = preference_pairs(world, 2000, seed=0)            # [{prompt, chosen, rejected}]
    write_jsonl("pairs.jsonl", rows)                        # the normal data path reads it
    reward = oracle_reward_fn(world, kind="token")          # fn(prompts, completions, **row) -> list[float]
    rate, stderr = oracle_win_rate(world, prompts, policy_texts, baseline_texts)

Preferences follow seed 001 Eq. 2: x uniform over the world's prompts, a, b ~ mu(x) i.i.d. (pi0 by
default), and a is chosen with probability sigmoid(gamma (log pi*(a|x) - log pi*(b|x))). Draws with
a == b are redrawn together (their loss is constant in the policy, and the data loader rejects
identical responses); redrawing both keeps the pair distribution mu(a) mu(b) restricted to a != b.
Misspecification switches: `label_gamma` (gamma' != gamma), symmetric `label_noise` eps (the label
is flipped with probability eps), and `preference_model="reward"` (Bradley-Terry on the token reward
r instead of log pi*).

Which oracle reward makes pi* an optimum: with r(x, y) = sum_t w(x, y_t) (kind="token"), RLHF from pi0
with KL coefficient beta = world.beta has optimum pi0 exp(r/beta)/Z = pi*. With log pi*(y|x)
(kind="logprob"), the reverse-KL objective E[R] + gamma H(pi) - beta KL(pi||pi0) of seed 001 Eq. 16 has
optimum pi0^alpha exp(R/(beta+gamma)) = pi* at beta = 0, gamma = 1 (pure entropy regularisation).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from distalign.data.files import write_text_atomic

from .lm import LMWorld, sequence_count, sequence_index, sequence_reward

SAMPLERS = ("reference", "target")
PREFERENCE_MODELS = ("target", "reward")
MAX_REDRAWS = 1000


def _draw_prompts(world: LMWorld, n: int, gen: torch.Generator) -> Tensor:
    if n < 1:
        raise ValueError(f"n: expected >= 1 rows, found {n}")
    return torch.randint(len(world.prompts), (n,), generator=gen)


def _distinct_pairs(world: LMWorld, x: Tensor, sampler: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """a, b ~ mu(x) i.i.d. conditioned on a != b (both redrawn where equal)."""
    lm = {"reference": world.reference, "target": world.target}[sampler]
    a, b = lm.sample(x, gen), lm.sample(x, gen)
    for _ in range(MAX_REDRAWS):
        same = (a == b).all(dim=1)
        if not same.any():
            return a, b
        a[same], b[same] = lm.sample(x[same], gen), lm.sample(x[same], gen)
    raise ValueError(f"sampler={sampler!r}: still drew identical pairs after {MAX_REDRAWS} redraws; "
                     "mu(x) is nearly deterministic")


def labelled_pairs(world: LMWorld, n: int, seed: int = 0, *, sampler: str = "reference",
                   label_gamma: float | None = None, label_noise: float = 0.0,
                   preference_model: str = "target") -> tuple[Tensor, Tensor, Tensor]:
    """n labelled pairs as tensors (x (n,), chosen (n, L+1), rejected (n, L+1)); P(a chosen) =
    (1-eps) s + eps (1-s), s = sigmoid(gamma' (log pi*(a|x) - log pi*(b|x)))
    (or sigmoid(gamma' (r(x,a) - r(x,b))) for preference_model="reward")."""
    if sampler not in SAMPLERS or preference_model not in PREFERENCE_MODELS:
        raise ValueError(f"sampler / preference_model: expected one of {SAMPLERS} / {PREFERENCE_MODELS}, "
                         f"found {sampler!r} / {preference_model!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise: expected a probability in [0, 1], found {label_noise}")
    gamma = world.gamma if label_gamma is None else label_gamma
    gen = torch.Generator().manual_seed(seed)
    x = _draw_prompts(world, n, gen)
    a, b = _distinct_pairs(world, x, sampler, gen)
    if preference_model == "target":
        margin = world.target.logprob(x, a) - world.target.logprob(x, b)
    else:
        margin = sequence_reward(world.token_reward, x, a) - sequence_reward(world.token_reward, x, b)
    p_a = torch.sigmoid(gamma * margin)
    p_a = (1 - label_noise) * p_a + label_noise * (1 - p_a)
    a_wins = torch.rand(n, generator=gen, dtype=torch.float64) < p_a
    return x, torch.where(a_wins[:, None], a, b), torch.where(a_wins[:, None], b, a)


def preference_pairs(world: LMWorld, n: int, seed: int = 0, **options) -> list[dict]:
    """n rows {prompt, chosen, rejected} drawn by `labelled_pairs` (same options)."""
    x, chosen, rejected = labelled_pairs(world, n, seed, **options)
    return [{"prompt": world.prompts[i], "chosen": c, "rejected": r}
            for i, c, r in zip(x.tolist(), world.decode(chosen), world.decode(rejected))]


def preference_wins(world: LMWorld, n: int, seed: int = 0, **options) -> Tensor:
    """The same n pairs as `preference_pairs(world, n, seed, **options)` as win counts W (X, M, M):
    W[x, a, b] = number of rows with prompt x, chosen a and rejected b, responses indexed in
    `lm.all_sequences` order. Every pairwise loss of a policy is then a W-weighted sum over the
    (X, M) table of its log-probs, at a cost that does not grow with n."""
    x, chosen, rejected = labelled_pairs(world, n, seed, **options)
    n_words, size = len(world.words), sequence_count(len(world.words), world.max_len)
    cell = (x * size + sequence_index(chosen, n_words)) * size + sequence_index(rejected, n_words)
    counts = torch.bincount(cell, minlength=len(world.prompts) * size * size)
    return counts.to(torch.float64).view(len(world.prompts), size, size)


def demonstrations(world: LMWorld, n: int, seed: int = 0) -> list[dict]:
    """n rows {prompt, completion} with x uniform and completion ~ pi*(.|x)."""
    gen = torch.Generator().manual_seed(seed)
    x = _draw_prompts(world, n, gen)
    texts = world.decode(world.target.sample(x, gen))
    return [{"prompt": world.prompts[i], "completion": t} for i, t in zip(x.tolist(), texts)]


def prompt_rows(world: LMWorld, n: int, seed: int = 0) -> list[dict]:
    """n rows {prompt} with x uniform over the world's prompts."""
    x = _draw_prompts(world, n, torch.Generator().manual_seed(seed))
    return [{"prompt": world.prompts[i]} for i in x.tolist()]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write via a temporary name and rename: a reader (a trainer in another process of the same run)
    sees the old file or the new one, never half of one."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_world_datasets(world: LMWorld, out_dir: str | Path, *, n_pairs: int, n_demos: int, n_prompts: int,
                         seed: int = 0, **pair_options) -> dict[str, Path]:
    """world.json, pairs.jsonl, demonstrations.jsonl and prompts.jsonl under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.{ext}" for name, ext in
             (("world", "json"), ("pairs", "jsonl"), ("demonstrations", "jsonl"), ("prompts", "jsonl"))}
    world.save(paths["world"])
    write_jsonl(paths["pairs"], preference_pairs(world, n_pairs, seed, **pair_options))
    write_jsonl(paths["demonstrations"], demonstrations(world, n_demos, seed + 1))
    write_jsonl(paths["prompts"], prompt_rows(world, n_prompts, seed + 2))
    return paths


# -- oracles ------------------------------------------------------------------------------------
def oracle_reward(world: LMWorld, prompts: list[str], completions: list[str], kind: str = "logprob",
                  invalid_reward: float = -30.0) -> list[float]:
    """log pi*(y|x) (kind="logprob") or r(x, y) = sum_t w(x, y_t) (kind="token"); see the module
    docstring for the objective each makes optimal. Completions off the support (unknown word,
    empty, longer than max_len) get `invalid_reward`, a finite penalty an RL update can use."""
    if kind == "logprob":
        values = world.logprob(list(prompts), list(completions))
    elif kind == "token":
        values = world.token_reward_sum(list(prompts), list(completions))
    else:
        raise ValueError(f"kind: expected 'logprob' or 'token', found {kind!r}")
    return [v if math.isfinite(v) else invalid_reward for v in values.tolist()]


def oracle_reward_fn(world: LMWorld, kind: str = "logprob", invalid_reward: float = -30.0):
    """A Python reward callable `fn(prompts, completions, **row) -> list[float]` for online training."""
    def reward(prompts: list[str], completions: list[str], **row) -> list[float]:
        return oracle_reward(world, prompts, completions, kind, invalid_reward)
    return reward


@functools.lru_cache(maxsize=8)
def _saved_world(path: str) -> LMWorld:
    return LMWorld.load(path)


def world_logprob_reward(prompts: list[str], completions: list[str], *, world: str,
                         invalid_reward: float = -30.0, **columns) -> list[float]:
    """The exact reward gamma * log pi*(y|x) of the world saved at `world` (a world.json), as a reward
    plug-in: `rewards=[{kind: callable, path: 'distalign.testbed.lm_data:world_logprob_reward',
    kwargs: {world: data/world.json}}]`. It is what a reward model trained on the world's preferences
    estimates (up to a constant per prompt); text off pi*'s support gets `invalid_reward`."""
    loaded = _saved_world(str(world))
    values = loaded.logprob(list(prompts), list(completions)).tolist()
    return [loaded.gamma * v if math.isfinite(v) else invalid_reward for v in values]


def oracle_prefers(world: LMWorld, prompt: str, a: str, b: str) -> float:
    """P*(a > b | x) = sigmoid(gamma (log pi*(a|x) - log pi*(b|x))); a response off the support loses,
    two off the support tie at 1/2."""
    logps = world.logprob([prompt, prompt], [a, b])
    if math.isinf(logps[0]) and math.isinf(logps[1]):
        return 0.5
    return float(torch.sigmoid(world.gamma * (logps[0] - logps[1])))


def oracle_judge(world: LMWorld):
    """`prob_a_beats_b(prompt, a, b)` for `distalign.evaluation.oracle_winrate`."""
    return lambda prompt, a, b: oracle_prefers(world, prompt, a, b)


def oracle_win_rate(world: LMWorld, prompts: list[str], policy_samples: list[str],
                    baseline_samples: list[str]) -> tuple[float, float]:
    """(W, stderr): W = mean_i P*(policy_i > baseline_i | x_i), stderr = sqrt(s^2 / n)."""
    if not len(prompts) == len(policy_samples) == len(baseline_samples) or not prompts:
        raise ValueError(f"oracle_win_rate: expected equal non-zero lengths, found {len(prompts)} prompts, "
                         f"{len(policy_samples)} policy and {len(baseline_samples)} baseline samples")
    ours = world.logprob(list(prompts), list(policy_samples))
    theirs = world.logprob(list(prompts), list(baseline_samples))
    scores = torch.sigmoid(world.gamma * (ours - theirs))
    scores = torch.where(torch.isinf(ours) & torch.isinf(theirs), torch.full_like(scores, 0.5), scores)
    stderr = float(scores.std(unbiased=True) / math.sqrt(len(scores))) if len(scores) > 1 else math.nan
    return float(scores.mean()), stderr
