"""Model-based metrics: KL(pi||pi0) on the policy's own samples, reward-model score, RM accuracy.

Seed 001 Table 2 reports exactly these beside the win-rate: the RM score of the learned reward model
and KL(pi||pi0) on responses sampled from pi. All summaries are a mean and its standard error
(sample standard deviation / sqrt(n)).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distalign import models
from distalign.data import DEFAULT_CHAT, ChatFormat, TokenizedPair, response_end_id, tokenize_prompts
from distalign.objectives import kl_estimate


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sqrt(s^2 / n)) with s^2 the unbiased sample variance; NaN where undefined (n < 1 / n < 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def kl_to_reference(policy_logps: Tensor, ref_logps: Tensor) -> dict:
    """KL(pi||pi0) from y_i ~ pi(.|x_i): log pi(y_i|x_i) and log pi0(y_i|x_i), shapes (N,).

    k1 = mean of l_i = log pi - log pi0 (unbiased, can be negative on few samples);
    k3 = mean of exp(-l_i) - 1 + l_i (unbiased, >= 0, lower variance when pi is near pi0);
    Schulman 2020 "Approximating KL divergence"; the estimators are `objectives.kl_estimate`.
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 1:
        raise ValueError(f"kl_to_reference: want two (N,) tensors, got {tuple(policy_logps.shape)} "
                         f"and {tuple(ref_logps.shape)}")
    policy64, ref64 = policy_logps.detach().double().cpu(), ref_logps.detach().double().cpu()
    k1_mean, k1_stderr = mean_stderr(kl_estimate(policy64, ref64, "k1").tolist())
    k3_mean, k3_stderr = mean_stderr(kl_estimate(policy64, ref64, "k3").tolist())
    return {"kl": k1_mean, "kl_stderr": k1_stderr, "kl_k3": k3_mean, "kl_k3_stderr": k3_stderr,
            "n": int(policy_logps.numel())}


def rm_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> dict:
    """RewardBench-style accuracy: fraction of held-out pairs with R(chosen) > R(rejected), ties half."""
    if len(chosen_rewards) != len(rejected_rewards):
        raise ValueError(f"rm_accuracy: {len(chosen_rewards)} chosen but {len(rejected_rewards)} rejected rewards")
    hits = [1.0 if c > r else 0.0 if c < r else 0.5 for c, r in zip(chosen_rewards, rejected_rewards)]
    accuracy, stderr = mean_stderr(hits)
    return {"accuracy": accuracy, "stderr": stderr, "n": len(hits)}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() and no autograd inside; the caller's train/eval flag is restored after."""
    with models.evaluating(model), torch.inference_mode():
        yield model


@contextlib.contextmanager
def _padding(tokenizer, side: str):
    """Temporarily pad on `side`, with EOS as the pad token if the tokenizer has none (Pythia, Llama)."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


def reward_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                  batch_size: int = 8, chat: ChatFormat = DEFAULT_CHAT) -> list[float]:
    """R(x, y) from a 1-label AutoModelForSequenceClassification, tokenised as the reward trainer does."""
    return models.reward_scores(model, tokenizer, prompts, responses, batch_size, chat=chat).tolist()


@dataclass
class Samples:
    """Responses sampled from a policy: ids end with EOS unless the length limit cut them."""

    prompts_ids: list[list[int]]
    responses_ids: list[list[int]]
    texts: list[str]
    n_without_eos: int      # responses cut at max_new_tokens (reported, never hidden)


def _cut_at_eos(generated: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(generated):
        if token in eos_ids:
            return generated[:position + 1], True
    return generated, False


def sample_responses(model, tokenizer, prompts: Sequence, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 8,
                     chat: ChatFormat = DEFAULT_CHAT) -> Samples:
    """y_i ~ pi(.|x_i) by model.generate on left-padded batches; temperature <= 0 means greedy.

    Prompts are tokenised as the trainers do (`chat`: through the chat template when it applies), and
    generation stops at the model's EOS ids and at the token responses end with (the template's
    end-of-turn token). The torch RNG is seeded with `seed` inside a fork, so the caller's RNG state is
    untouched.
    """
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
    eos_ids.add(response_end_id(tokenizer, chat))
    all_prompt_ids = tokenize_prompts(list(prompts), tokenizer, chat=chat)
    prompts_ids, responses_ids, texts, n_without_eos = [], [], [], 0
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    rng_devices = [device] if device.type == "cuda" else []
    with _padding(tokenizer, "left"), eval_mode(model), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.pad({"input_ids": all_prompt_ids[start:start + batch_size]}, return_tensors="pt")
            batch = batch.to(device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=sorted(eos_ids), **sampling)
            width = batch["input_ids"].shape[1]
            for row in range(output.shape[0]):
                mask = batch["attention_mask"][row].bool()
                prompts_ids.append(batch["input_ids"][row][mask].tolist())
                response, ended = _cut_at_eos(output[row, width:].tolist(), eos_ids)
                n_without_eos += not ended
                responses_ids.append(response)
                texts.append(tokenizer.decode(response, skip_special_tokens=True))
    return Samples(prompts_ids, responses_ids, texts, n_without_eos)


def response_logps(model, prompts_ids: Sequence[list[int]], responses_ids: Sequence[list[int]],
                   pad_token_id: int, batch_size: int = 8) -> Tensor:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over response tokens only, fp32, shape (N,).

    Two consecutive rows with the same prompt (k samples per prompt, as evaluation sets are laid out) are
    scored in one shared-prompt row (`models.pair_logps`): the same numbers, the prompt encoded once, which
    is most of the tokens when prompts are longer than responses. `batch_size` responses per forward."""
    device = next(model.parameters()).device
    doubles, singles = _same_prompt_neighbours(prompts_ids)
    out = torch.zeros(len(prompts_ids))

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    with eval_mode(model), torch.no_grad():
        step = max(1, batch_size // 2)
        for start in range(0, len(doubles), step):
            rows = doubles[start:start + step]
            pairs = [TokenizedPair(prompts_ids[i], responses_ids[i], responses_ids[i + 1]) for i in rows]
            scored = models.pair_logps(model, to_device(models.collate_pairs(pairs, pad_token_id)))
            index = torch.tensor(rows)
            out[index], out[index + 1] = scored.chosen_logps.float().cpu(), scored.rejected_logps.float().cpu()
        for start in range(0, len(singles), batch_size):
            rows = singles[start:start + batch_size]
            batch = models.collate_sequences([prompts_ids[i] for i in rows], [responses_ids[i] for i in rows],
                                             pad_token_id)
            out[torch.tensor(rows)] = models.sequence_logps(model, to_device(batch))[0].float().cpu()
    return out


def _same_prompt_neighbours(prompts_ids: Sequence[list[int]]) -> tuple[list[int], list[int]]:
    """Rows i that start a (i, i + 1) same-prompt couple (taken left to right, not overlapping), and the rest."""
    doubles, singles, i = [], [], 0
    while i < len(prompts_ids):
        if i + 1 < len(prompts_ids) and list(prompts_ids[i]) == list(prompts_ids[i + 1]):
            doubles.append(i)
            i += 2
        else:
            singles.append(i)
            i += 1
    return doubles, singles
