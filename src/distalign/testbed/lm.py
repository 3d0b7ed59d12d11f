"""Synthetic-language ground truth: exact autoregressive target pi* and reference pi0 over word sequences.

    world = LMWorld.create(seed=0)                         # 8 words + EOS, length <= 4, 8 prompts
    world.logprob(["write about cats"], ["ka lo mi"])      # exact log pi*(y|x), float64
    texts = world.sample_text(["write about cats"] * 5, seed=1)

The family (`BigramLM`) is a position-dependent bigram: p(y_t | x, t, y_{t-1}) over V words plus EOS,
with EOS forbidden at t=0 (responses are never empty) and forced at t=L, so every distribution sums
to 1 over the sequences of 1..L words. pi0 is a context-dependent bigram; the target is pi0 tilted by a
token-additive reward r(x, y) = sum_t w(x, y_t) (the EOS token included):

    pi*(y|x) = pi0(y|x) exp(r(x, y)/beta) / Z(x)                     (RLHF optimum, seed 002 / DPO Eq. 4)

and is again a position-dependent bigram, computed exactly by a backward pass over (position, last
word) (`tilt`). So pi* is the RLHF optimum from pi0 with reward r and KL coefficient beta, and
preferences follow seed 001 Eq. 2: P(a > b | x) = sigmoid(gamma (log pi*(a|x) - log pi*(b|x))).
Text rendering: a response is its words joined by single spaces; the world's EOS is the tokenizer's
EOS and never appears in the text.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

WORD_POOL = ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "va", "xe", "yo", "zu", "bi", "do", "fa", "gu")
TOPIC_POOL = ("cats", "rivers", "storms", "bread", "music", "stars", "trains", "gardens",
              "winter", "islands", "clocks", "forests", "markets", "ships", "mountains", "letters")


@dataclass(frozen=True)
class BigramLM:
    """p(y_t = v | x, t, y_{t-1} = s) as `cond_logp` of shape (X, L+1, V+1, V+1) in float64.

    Index V is EOS as a next token and BOS as a previous state (the state at t=0). A sequence is a
    LongTensor row of length L+1 whose words are followed by EOS, the rest padded with EOS.
    """

    cond_logp: Tensor

    @property
    def n_words(self) -> int:
        return self.cond_logp.shape[-1] - 1

    @property
    def max_len(self) -> int:
        return self.cond_logp.shape[1] - 1

    def logprob(self, x: Tensor, tokens: Tensor) -> Tensor:
        """log p(y|x) = sum_{t <= len(y)} log p(y_t | x, t, y_{t-1}); x (N,), tokens (N, L+1) -> (N,)."""
        eos = self.n_words
        n, width = tokens.shape
        active = response_mask(tokens, eos)
        prev = torch.cat([torch.full((n, 1), eos, dtype=torch.long), tokens[:, :-1]], dim=1)
        t = torch.arange(width).expand(n, width)
        token_logps = self.cond_logp[x[:, None].expand(n, width), t, prev, tokens]       # (N, L+1)
        return torch.where(active, token_logps, torch.zeros((), dtype=token_logps.dtype)).sum(dim=1)

    def sample(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Exact ancestral samples, one per entry of x (N,) -> tokens (N, L+1)."""
        eos = self.n_words
        tokens = torch.full((len(x), self.max_len + 1), eos, dtype=torch.long)
        prev = torch.full((len(x),), eos, dtype=torch.long)
        done = torch.zeros(len(x), dtype=torch.bool)
        for t in range(self.max_len + 1):
            probs = self.cond_logp[x, t, prev].exp()
            step = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            step = torch.where(done, torch.full_like(step, eos), step)
            tokens[:, t] = step
            done = done | (step == eos)
            prev = step
        return tokens


def response_mask(tokens: Tensor, eos: int) -> Tensor:
    """True at the words and the first EOS of each row (N, L+1): the positions log p(y|x) sums over."""
    is_eos = (tokens == eos).long()
    return (torch.cumsum(is_eos, dim=1) - is_eos) == 0


def sequence_reward(token_reward: Tensor, x: Tensor, tokens: Tensor) -> Tensor:
    """r(x, y) = sum_t w(x, y_t) over the words and the final EOS; token_reward (X, V+1) -> (N,)."""
    eos = token_reward.shape[1] - 1
    rewards = token_reward[x[:, None], tokens]
    return torch.where(response_mask(tokens, eos), rewards, torch.zeros((), dtype=rewards.dtype)).sum(1)


def bigram_from_logits(logits: Tensor, max_len: int) -> BigramLM:
    """Position-independent logits (X, V+1, V+1) -> BigramLM with EOS banned at t=0 and forced at t=L."""
    n_prompts, states, vocab = logits.shape
    cond = logits.to(torch.float64)[:, None].expand(n_prompts, max_len + 1, states, vocab).clone()
    cond[:, 0, :, vocab - 1] = -math.inf
    cond[:, max_len, :, : vocab - 1] = -math.inf
    return BigramLM(torch.log_softmax(cond, dim=-1))


def tilt(base: BigramLM, token_reward: Tensor, beta: float) -> tuple[BigramLM, Tensor]:
    """The tilted model p(y|x) ∝ base(y|x) exp(r(x,y)/beta), r = sum_t w(x, y_t), and log Z(x).

    Backward pass: log Z_t(s) = logsumexp_v [log base(v|t,s) + w(v)/beta + 1{v != EOS} log Z_{t+1}(v)],
    with the EOS branch ending the sequence; the tilted conditional is
    log p(v|t,s) = log base(v|t,s) + w(v)/beta + 1{v != EOS} log Z_{t+1}(v) - log Z_t(s).
    token_reward: (X, V+1) with the EOS column last. Returns (model, log Z_0(BOS) of shape (X,)).
    """
    if beta <= 0:
        raise ValueError(f"beta: expected > 0, found {beta}")
    cond = base.cond_logp
    n_prompts, width, _, vocab = cond.shape
    bonus = (token_reward.to(torch.float64) / beta)[:, None, :]          # (X, 1, V+1)
    future = torch.zeros(n_prompts, vocab, dtype=torch.float64)          # log Z_{t+1}(v); EOS column stays 0
    tilted = torch.empty_like(cond)
    for t in reversed(range(width)):
        scores = cond[:, t] + bonus + future[:, None, :]                  # (X, S, V+1)
        log_z = torch.logsumexp(scores, dim=-1)                           # (X, S)
        tilted[:, t] = scores - log_z[..., None]
        future = torch.cat([log_z[:, : vocab - 1], torch.zeros(n_prompts, 1, dtype=torch.float64)], dim=1)
    return BigramLM(tilted), log_z[:, vocab - 1]


def exact_kl(p: BigramLM, q: BigramLM) -> Tensor:
    """KL(p(.|x) || q(.|x)) per prompt (X,) by a forward pass over state occupancies.

    KL = sum_t sum_s P_p(y_{t-1} = s, not ended) sum_v p(v|t,s) (log p(v|t,s) - log q(v|t,s)).
    """
    n_prompts, width, states, vocab = p.cond_logp.shape
    occupancy = torch.zeros(n_prompts, states, dtype=torch.float64)
    occupancy[:, states - 1] = 1.0                                        # BOS at t=0
    kl = torch.zeros(n_prompts, dtype=torch.float64)
    for t in range(width):
        log_p, log_q = p.cond_logp[:, t], q.cond_logp[:, t]
        probs = log_p.exp()
        # 0 * log(0/q) = 0; p > 0 where q = 0 correctly gives +inf
        terms = torch.where(probs > 0, probs * (log_p - log_q), torch.zeros((), dtype=torch.float64))
        kl = kl + (occupancy * terms.sum(-1)).sum(-1)
        next_occ = torch.einsum("xs,xsv->xv", occupancy, probs)
        occupancy = torch.cat([next_occ[:, : vocab - 1], torch.zeros(n_prompts, 1, dtype=torch.float64)], 1)
    return kl


def all_sequences(n_words: int, max_len: int) -> Tensor:
    """Every response of 1..max_len words as tokens (M, L+1), M = sum_l V^l, shortest first."""
    rows = []
    for length in range(1, max_len + 1):
        index = torch.arange(n_words ** length)
        digits = torch.stack([(index // n_words ** (length - 1 - i)) % n_words for i in range(length)], 1)
        pad = torch.full((len(index), max_len + 1 - length), n_words, dtype=torch.long)
        rows.append(torch.cat([digits, pad], dim=1))
    return torch.cat(rows)


def sequence_count(n_words: int, max_len: int) -> int:
    return sum(n_words ** length for length in range(1, max_len + 1))


def sequence_index(tokens: Tensor, n_words: int) -> Tensor:
    """Row index of each response (N, L+1) in `all_sequences(n_words, L)`: the responses of fewer
    words come first, then the base-V number of the words (the inverse of all_sequences)."""
    lengths = response_mask(tokens, n_words).sum(1) - 1                       # words before EOS
    shorter = torch.tensor([sequence_count(n_words, k - 1) if k else 0 for k in range(tokens.shape[1])])
    number = torch.zeros(len(tokens), dtype=torch.long)
    for t in range(tokens.shape[1] - 1):
        number = torch.where(t < lengths, number * n_words + tokens[:, t], number)
    return shorter[lengths] + number


@dataclass(eq=False)   # tensors inside: compare worlds with to_dict()
class LMWorld:
    """Words, prompts, reference logits and token reward: everything else is derived exactly.

    ref_logits (X, V+1, V+1): pi0's bigram logits, row V = after BOS, column V = EOS.
    token_reward (X, V+1): w(x, v), EOS last. beta: tilt temperature; gamma: preference sharpness.
    """

    words: list[str]
    prompts: list[str]
    max_len: int
    ref_logits: Tensor
    token_reward: Tensor
    beta: float = 1.0
    gamma: float = 1.0

    def __post_init__(self):
        vocab = len(self.words) + 1
        if self.ref_logits.shape != (len(self.prompts), vocab, vocab):
            raise ValueError(f"ref_logits: expected shape {(len(self.prompts), vocab, vocab)}, "
                             f"found {tuple(self.ref_logits.shape)}")
        if self.token_reward.shape != (len(self.prompts), vocab):
            raise ValueError(f"token_reward: expected shape {(len(self.prompts), vocab)}, "
                             f"found {tuple(self.token_reward.shape)}")
        if len(set(self.prompts)) != len(self.prompts) or len(set(self.words)) != len(self.words):
            raise ValueError("prompts/words: expected distinct entries, found duplicates")
        if any(not w or any(c.isspace() for c in w) for w in self.words):
            raise ValueError("words: expected non-empty words without whitespace")
        self.reference = bigram_from_logits(self.ref_logits, self.max_len)
        self.target, self.log_normaliser = tilt(self.reference, self.token_reward, self.beta)
        self._prompt_index = {p: i for i, p in enumerate(self.prompts)}
        self._word_index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def create(cls, seed: int = 0, *, n_words: int = 8, max_len: int = 4, n_prompts: int = 8,
               ref_scale: float = 1.0, prompt_scale: float = 0.5, eos_logit: float = 1.0,
               reward_scale: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> LMWorld:
        """A random world: pi0 logits = shared N(0, ref_scale^2) + per-prompt N(0, prompt_scale^2)
        (+ eos_logit on EOS), w(x, v) ~ N(0, reward_scale^2) on words and 0 on EOS."""
        if not 1 <= n_words <= len(WORD_POOL) or not 1 <= n_prompts <= len(TOPIC_POOL) or max_len < 1:
            raise ValueError(f"n_words (1..{len(WORD_POOL)}), n_prompts (1..{len(TOPIC_POOL)}), "
                             f"max_len (>= 1): "
                             f"found {n_words}, {n_prompts}, {max_len}")
        gen = torch.Generator().manual_seed(seed)
        vocab = n_words + 1
        shared = ref_scale * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64)
        per_prompt = prompt_scale * torch.randn(n_prompts, vocab, vocab, generator=gen, dtype=torch.float64)
        ref_logits = shared + per_prompt
        ref_logits[..., n_words] += eos_logit
        reward = reward_scale * torch.randn(n_prompts, vocab, generator=gen, dtype=torch.float64)
        reward[:, n_words] = 0.0
        return cls(list(WORD_POOL[:n_words]), [f"write about {t}" for t in TOPIC_POOL[:n_prompts]],
                   max_len, ref_logits, reward, beta, gamma)

    # -- text <-> tokens ------------------------------------------------------------------------
    def prompt_ids(self, prompts: list[str]) -> Tensor:
        missing = [p for p in prompts if p not in self._prompt_index]
        if missing:
            raise ValueError(f"prompt: {missing[0]!r} is not one of this world's {len(self.prompts)} prompts")
        return torch.tensor([self._prompt_index[p] for p in prompts], dtype=torch.long)

    def encode(self, responses: list[str]) -> tuple[Tensor, Tensor]:
        """(tokens (N, L+1), in_support (N,)): out-of-support texts (unknown word, empty, too long)
        get in_support False and an all-EOS row."""
        eos = len(self.words)
        tokens = torch.full((len(responses), self.max_len + 1), eos, dtype=torch.long)
        valid = torch.zeros(len(responses), dtype=torch.bool)
        for i, text in enumerate(responses):
            parts = text.split()
            if 1 <= len(parts) <= self.max_len and all(w in self._word_index for w in parts):
                tokens[i, : len(parts)] = torch.tensor([self._word_index[w] for w in parts])
                valid[i] = True
        return tokens, valid

    def decode(self, tokens: Tensor) -> list[str]:
        eos = len(self.words)
        return [" ".join(self.words[v] for v in row.tolist()[: row.tolist().index(eos)]) for row in tokens]

    # -- exact quantities ---------------------------------------------------------------------
    def logprob(self, prompts: list[str], responses: list[str], model: str = "target") -> Tensor:
        """Exact log pi*(y|x) (model="target") or log pi0(y|x) ("reference"); -inf off the support."""
        lm = {"target": self.target, "reference": self.reference}[model]
        tokens, valid = self.encode(responses)
        logps = lm.logprob(self.prompt_ids(prompts), tokens)
        return torch.where(valid, logps, torch.full_like(logps, -math.inf))

    def token_reward_sum(self, prompts: list[str], responses: list[str]) -> Tensor:
        """r(x, y) = sum_t w(x, y_t) over the words and the final EOS; NaN off the support."""
        tokens, valid = self.encode(responses)
        rewards = sequence_reward(self.token_reward, self.prompt_ids(prompts), tokens)
        return torch.where(valid, rewards, torch.full_like(rewards, math.nan))

    def sample_text(self, prompts: list[str], seed: int, model: str = "target") -> list[str]:
        lm = {"target": self.target, "reference": self.reference}[model]
        return self.decode(lm.sample(self.prompt_ids(prompts), torch.Generator().manual_seed(seed)))

    def corpus(self, n_samples: int = 200, seed: int = 0) -> list[str]:
        """Text to train a tokenizer on: every prompt, every word alone, and samples of both models."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(len(self.prompts), (n_samples,), generator=gen)
        texts = self.decode(self.target.sample(x, gen)) + self.decode(self.reference.sample(x, gen))
        return list(self.prompts) + list(self.words) + texts

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"words": self.words, "prompts": self.prompts, "max_len": self.max_len,
                "ref_logits": self.ref_logits.tolist(), "token_reward": self.token_reward.tolist(),
                "beta": self.beta, "gamma": self.gamma}

    def save(self, path: str | Path) -> None:
        """JSON; Python's float repr round-trips float64 exactly, so a loaded world is bit-identical."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LMWorld:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        missing = {"words", "prompts", "max_len", "ref_logits", "token_reward"} - set(data)
        if missing:
            raise ValueError(f"{path}: missing field(s) {sorted(missing)}")
        return cls(list(data["words"]), list(data["prompts"]), int(data["max_len"]),
                   torch.tensor(data["ref_logits"], dtype=torch.float64),
                   torch.tensor(data["token_reward"], dtype=torch.float64),
                   float(data.get("beta", 1.0)), float(data.get("gamma", 1.0)))
