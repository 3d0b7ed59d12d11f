"""Scoring an arbitrary policy (e.g. a Hugging Face transformer) against a world's exact target.

    tokenizer = world_tokenizer(world)                          # every world word is one token
    policy_logps = hf_policy_logprob_fn(model, tokenizer)       # (prompts, responses) -> Tensor (N,)
    estimate = kl_target_to_policy(world, policy_logps)         # exact when |space| <= 20k per prompt

The policy enters only through `policy_logprob_fn(prompts, responses) -> Tensor` of summed response
log-probs (EOS included), so nothing here depends on the trainer. KL(pi*||pi) needs pi's log-probs
only on pi*'s support, so it is exact by enumeration even when pi can also write other text.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.data import tokenize_prompts, tokenize_responses
from distalign.models import collate_sequences, sequence_logps

from .lm import LMWorld, all_sequences, sequence_count

PolicyLogprobFn = Callable[[list[str], list[str]], Tensor]


@dataclass(frozen=True)
class KLEstimate:
    """E_x KL(pi*(x) || pi(x)) with x uniform over the world's prompts; stderr is 0 when exact."""

    value: float
    stderr: float
    exact: bool
    per_prompt: list[float]
    n_scored: int          # (prompt, response) pairs the policy scored


def kl_target_to_policy(world: LMWorld, policy_logprob_fn: PolicyLogprobFn, *, method: str = "auto",
                        max_enumerate: int = 20_000, n_samples: int = 4096, batch_size: int = 512,
                        seed: int = 0) -> KLEstimate:
    """KL(pi*||pi) = E_{y ~ pi*} [log pi*(y|x) - log pi(y|x)], averaged over prompts.

    method="exact": sum over all sum_l V^l responses of each prompt; "mc": n_samples draws from pi*,
    split evenly over prompts (stratified), stderr = sqrt(sum_x s_x^2 / n_x) / X;
    "auto": exact when the space has at most max_enumerate responses per prompt.
    """
    if method not in ("auto", "exact", "mc"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'mc', found {method!r}")
    exact = method == "exact" or (method == "auto"
                                  and sequence_count(len(world.words), world.max_len) <= max_enumerate)
    if exact:
        return _kl_by_enumeration(world, policy_logprob_fn, batch_size)
    per_prompt_n = max(2, n_samples // len(world.prompts))
    return _kl_by_sampling(world, policy_logprob_fn, per_prompt_n, batch_size, seed)


def _score(policy_logprob_fn: PolicyLogprobFn, prompts: list[str], responses: list[str],
           batch_size: int) -> Tensor:
    parts = [policy_logprob_fn(prompts[i:i + batch_size], responses[i:i + batch_size])
             for i in range(0, len(prompts), batch_size)]
    return torch.cat([torch.as_tensor(p, dtype=torch.float64).reshape(-1) for p in parts])


def enumerated_logps(world: LMWorld, policy_logprob_fn: PolicyLogprobFn, batch_size: int = 512) -> Tensor:
    """log pi(y|x) of every response of the world's space: (X, M) float64, rows in `world.prompts`
    order, columns in `all_sequences` order."""
    texts = world.decode(all_sequences(len(world.words), world.max_len))
    return torch.stack([_score(policy_logprob_fn, [prompt] * len(texts), texts, batch_size)
                        for prompt in world.prompts])


def target_logps(world: LMWorld) -> Tensor:
    """log pi*(y|x) on the same (X, M) grid as `enumerated_logps`."""
    tokens = all_sequences(len(world.words), world.max_len)
    return torch.stack([world.target.logprob(torch.full((len(tokens),), x), tokens)
                        for x in range(len(world.prompts))])


def kl_from_enumerated(world: LMWorld, policy_logps: Tensor) -> KLEstimate:
    """Exact KL(pi*||pi) from the policy's enumerated log-probs (`enumerated_logps`)."""
    target = target_logps(world)
    probs = target.exp()
    terms = torch.where(probs > 0, probs * (target - policy_logps), torch.zeros((), dtype=torch.float64))
    per_prompt = terms.sum(1).tolist()
    return KLEstimate(sum(per_prompt) / len(per_prompt), 0.0, True, per_prompt, policy_logps.numel())


def mass_off_support(policy_logps: Tensor) -> float:
    """E_x pi(text outside pi*'s support | x) = 1 - sum_y pi(y|x) over the enumerated responses."""
    return float((1.0 - policy_logps.exp().sum(1)).clamp(min=0.0).mean())


def _wins_against(world: LMWorld, target: Tensor, x: Tensor, own_logps: Tensor, baseline_logps: Tensor) -> Tensor:
    """w(y) = E_{b ~ pi_b(x)} P*(y > b | x) for responses with log pi*(y|x) = own_logps (-inf off pi*'s
    support), x (N,) prompt indices: sum_b q(b) P*(y > b) plus the baseline's off-support mass q_off,
    which text on the support beats and text off it ties with (1/2), as `lm_data.oracle_prefers` judges."""
    q = baseline_logps[x].exp()                                             # (N, M)
    q_off = (1.0 - q.sum(1)).clamp(min=0.0)
    prefers = torch.sigmoid(world.gamma * (own_logps[:, None] - target[x]))   # 0 where own is -inf
    return (prefers * q).sum(1) + torch.where(torch.isfinite(own_logps), q_off, 0.5 * q_off)


def exact_win_rate(world: LMWorld, policy_logps: Tensor, baseline_logps: Tensor) -> float:
    """E_x E_{a ~ pi, b ~ pi_b} P*(a > b | x), exactly, from both policies' enumerated log-probs (X, M):
    W = sum_a p(a) w(a) + p_off q_off / 2 per prompt (`_wins_against` for w), p_off = 1 - sum_a p(a).
    A policy against itself gets exactly 1/2 (P*(a > b) + P*(b > a) = 1)."""
    target = target_logps(world)
    rates = []
    for x in range(len(world.prompts)):
        index = torch.full((target.shape[1],), x)
        wins = _wins_against(world, target, index, target[x], baseline_logps)
        p = policy_logps[x].exp()
        p_off, q_off = (1.0 - p.sum()).clamp(min=0.0), (1.0 - baseline_logps[x].exp().sum()).clamp(min=0.0)
        rates.append(float(p @ wins + 0.5 * p_off * q_off))
    return sum(rates) / len(rates)


def sampled_win_rate(world: LMWorld, prompts: list[str], responses: list[str], baseline_logps: Tensor
                     ) -> tuple[float, float]:
    """(W, stderr) from the policy's samples against a baseline known exactly (enumerated log-probs):
    W = mean_i w(y_i), w_i = E_{b ~ pi_b(x_i)} P*(y_i > b | x_i). Unbiased for the exact win-rate, with the
    baseline's sampling noise integrated out: a shared baseline sample would shift every model's
    win-rate by the same chance amount; stderr = sqrt(s^2 / n) of the w_i."""
    if len(prompts) != len(responses) or len(prompts) < 2:
        raise ValueError(f"sampled_win_rate: expected as many responses as prompts (at least 2), found "
                         f"{len(responses)} and {len(prompts)}")
    wins = _wins_against(world, target_logps(world), world.prompt_ids(list(prompts)),
                         world.logprob(list(prompts), list(responses)), baseline_logps)
    return float(wins.mean()), float(wins.std(unbiased=True) / math.sqrt(len(wins)))


def _kl_by_enumeration(world: LMWorld, policy_logprob_fn: PolicyLogprobFn, batch_size: int) -> KLEstimate:
    return kl_from_enumerated(world, enumerated_logps(world, policy_logprob_fn, batch_size))


def _kl_by_sampling(world: LMWorld, policy_logprob_fn: PolicyLogprobFn, per_prompt_n: int, batch_size: int,
                    seed: int) -> KLEstimate:
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(len(world.prompts)).repeat_interleave(per_prompt_n)
    tokens = world.target.sample(x, gen)
    prompts = [world.prompts[i] for i in x.tolist()]
    policy_logps = _score(policy_logprob_fn, prompts, world.decode(tokens), batch_size)
    log_ratio = world.target.logprob(x, tokens) - policy_logps
    by_prompt = log_ratio.reshape(len(world.prompts), per_prompt_n)
    means, variances = by_prompt.mean(1), by_prompt.var(1, unbiased=True)
    stderr = math.sqrt(float(variances.sum()) / per_prompt_n) / len(world.prompts)
    return KLEstimate(float(means.mean()), stderr, False, means.tolist(), len(prompts))


def kl_policy_to_target(world: LMWorld, prompts: list[str], policy_samples: list[str],
                        policy_logps: Tensor) -> tuple[float, float]:
    """Monte Carlo KL(pi||pi*) = E_{y ~ pi} [log pi(y|x) - log pi*(y|x)] from the policy's own samples
    and their log-probs: (mean, stderr). A sample off pi*'s support makes it +inf, as it should."""
    target_logps = world.logprob(list(prompts), list(policy_samples))
    log_ratio = torch.as_tensor(policy_logps, dtype=torch.float64) - target_logps
    if len(log_ratio) < 2:
        raise ValueError(f"policy_samples: expected at least 2 samples, found {len(log_ratio)}")
    return float(log_ratio.mean()), float(log_ratio.std(unbiased=True) / math.sqrt(len(log_ratio)))


def hf_policy_logprob_fn(model, tokenizer, batch_size: int = 256,
                         device: str | None = None) -> PolicyLogprobFn:
    """Callback for a causal LM: sum over response tokens (EOS included) of log pi(token | prefix).

    Rendering matches `distalign.data`: the prompt with the tokenizer's default special tokens,
    the response with add_special_tokens=False followed by EOS; sequences right-padded.
    """
    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def policy_logps(prompts: list[str], responses: list[str]) -> Tensor:
        prompt_ids = tokenize_prompts(list(prompts), tokenizer)
        response_ids = tokenize_responses(list(responses), tokenizer)
        out = [_batch_logps(model, prompt_ids[i:i + batch_size], response_ids[i:i + batch_size],
                            pad_id, device) for i in range(0, len(prompt_ids), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    return policy_logps


def _batch_logps(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                 device) -> Tensor:
    """Summed response log-probs through the library's own scorer (the trainer's code path)."""
    batch = collate_sequences(prompt_ids, response_ids, pad_id)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return sequence_logps(model, batch)[0].cpu().to(torch.float64)


def world_tokenizer(world: LMWorld):
    """A word-level `PreTrainedTokenizerFast` over the world's text: every word is one token,
    prompts get a leading <bos>, responses (add_special_tokens=False) none; EOS is <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = sorted({w for text in [*world.prompts, *world.words] for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")
