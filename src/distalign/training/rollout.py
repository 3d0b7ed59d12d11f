"""Rollouts: the layout of sampled completions and the batched forwards that score them.

    batch = sampler.sample(policy, prompt_ids)                  # `sampling.py`; a SampledBatch
    out = response_forward(policy, batch, temperature=0.7)      # token_logps (B, T) with logits / T
    out = grouped_response_forward(policy, batch, 4, 0.7)       # the same numbers, each prompt encoded once

Layout of a sampled batch: `input_ids` (B, P + T) = [left-padded prompt | response, right-padded];
position ids count real tokens only (as `generate` does), so the scoring forward sees exactly the
positions the sampler used. The response ends at its first EOS (included); a response that reached
`max_new_tokens` without EOS is `truncated`. Log-probs are taken at the sampling temperature
(logits / T) with no top-k / top-p, so they are the sampler's own log-probs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.models import shared_prompt_attention, supports_shared_prompt
from distalign.models.logprobs import position_logps, scatter_positions


@dataclass
class SampledBatch:
    input_ids: Tensor        # (B, P + T)
    attention_mask: Tensor   # (B, P + T) 1 on prompt and response tokens (EOS included)
    position_ids: Tensor     # (B, P + T)
    prompt_length: int       # P, the padded prompt width
    response_mask: Tensor    # (B, T) float
    truncated: Tensor        # (B,) bool: no EOS within max_new_tokens
    token_logps: Tensor | None = None   # (B, T) the sampler's own log-probs at the temperature, if it kept them
    entropy: Tensor | None = None       # (B, T) entropy of the tempered distribution at each step, likewise

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length:]

    def select(self, rows: Tensor) -> SampledBatch:
        pick = lambda t: None if t is None else t[rows]
        return SampledBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                            self.prompt_length, self.response_mask[rows], self.truncated[rows],
                            pick(self.token_logps), pick(self.entropy))


def completion_texts(tokenizer, batch: SampledBatch) -> list[str]:
    """The decoded responses of a batch, each cut at its end (EOS included, then dropped as special)."""
    lengths = batch.response_mask.sum(-1).long().tolist()
    return tokenizer.batch_decode([ids[:n] for ids, n in zip(batch.response_ids.tolist(), lengths)],
                                  skip_special_tokens=True)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts right-aligned in a (B, P) tensor, so generated tokens follow them directly."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def response_mask_and_truncation(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """1 on tokens up to and including the first EOS; truncated = no EOS at all. (B, T) -> (B, T), (B,)."""
    is_eos = response_ids == eos_token_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before t
    return (eos_before == 0).float(), ~is_eos.any(-1)


def assemble_batch(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, eos_token_id: int) -> SampledBatch:
    """The full (B, P + T) layout from left-padded prompts and raw sampled responses."""
    response_mask, truncated = response_mask_and_truncation(response_ids, eos_token_id)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    return SampledBatch(input_ids, attention_mask, position_ids, prompt_ids.shape[1], response_mask, truncated)


@dataclass
class ResponseForward:
    token_logps: Tensor                 # (B, T) log pi(y_t | x, y_<t) at the temperature, 0 off the response
    values: Tensor | None = None     # (B, T) value of the state before y_t
    entropy: Tensor | None = None    # (B, T) entropy of the sampling distribution at t (no grad)


def response_forward(model, batch: SampledBatch, temperature: float = 1.0, value_head=None,
                     with_entropy: bool = False) -> ResponseForward:
    """One forward of [prompt | response]: per-token log-probs of the response (and values, entropy).

    Only the response tokens' predictors reach the LM head (`position_logps`): position P - 1 + t
    predicts response token t.
    """
    P, T = batch.prompt_length, batch.response_mask.shape[1]
    where = batch.response_mask.nonzero()                             # (N, 2): row, response index
    predictors = torch.stack([where[:, 0], P - 1 + where[:, 1]], 1)
    return _scored(model, batch, predictors, where, temperature, value_head, with_entropy,
                   lambda hidden: hidden[:, P - 1:P + T - 1], input_ids=batch.input_ids,
                   attention_mask=batch.attention_mask, position_ids=batch.position_ids)


def _scored(model, batch: SampledBatch, predictors: Tensor, where: Tensor, temperature: float, value_head,
            with_entropy: bool, value_states, **inputs) -> ResponseForward:
    """`ResponseForward` of the response tokens at `where` (N, 2), predicted at `predictors` (N, 2) of the
    forward's rows; `value_states(hidden)` gives the (B, T, H) states the value head reads."""
    out = position_logps(model, predictors, batch.response_ids[where[:, 0], where[:, 1]], temperature,
                         with_entropy=with_entropy, with_hidden=value_head is not None, **inputs)
    shape = tuple(batch.response_mask.shape)
    token_logps = scatter_positions(out.logps, where, shape)
    values = value_head(value_states(out.hidden)) * batch.response_mask if value_head is not None else None
    entropy = scatter_positions(out.entropy.detach(), where, shape) if with_entropy else None
    return ResponseForward(token_logps, values, entropy)


def entropy_of(log_probs: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v over the last dim of normalised log-probs."""
    return -(log_probs.exp() * log_probs).sum(-1)


def grouped_response_forward(model, batch: SampledBatch, group_size: int, temperature: float = 1.0,
                             value_head=None, with_entropy: bool = False) -> ResponseForward:
    """`response_forward` for rows that come in runs of `group_size` samples of one prompt, with each
    prompt encoded once: group g is one row [prompt | c_1 | ... | c_k] (each completion padded to T)
    under a 4D mask in which c_j sees the prompt and its own earlier tokens only, and c_j's positions
    continue from the prompt's end. Same numbers as the per-sample rows within fp32 rounding (test);
    (P + T) / (P / k + T) times fewer tokens. Falls back to `response_forward` when the rows are not
    such runs or the model's attention cannot take a 4D mask.
    """
    B, P, T, k = batch.input_ids.shape[0], batch.prompt_length, batch.response_mask.shape[1], group_size
    if k <= 1 or B % k or not supports_shared_prompt(model):
        return response_forward(model, batch, temperature, value_head, with_entropy)
    G = B // k
    prompts, prompt_mask = batch.input_ids[::k, :P], batch.attention_mask[::k, :P]
    if not torch.equal(batch.input_ids[:, :P].view(G, k, P), prompts[:, None].expand(G, k, P)):
        return response_forward(model, batch, temperature, value_head, with_entropy)
    device = prompts.device
    response_mask = batch.response_mask.reshape(G, k * T)
    completion = torch.arange(1, k + 1, device=device).repeat_interleave(T).expand(G, k * T)
    segment_ids = torch.cat([prompt_mask.long() - 1,                      # prompt 0, left padding -1
                             torch.where(response_mask > 0, completion, -1)], dim=1)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    response_positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(T, device=device).repeat(k)
    # Column P + j T + t holds token t of c_j, predicted at column P + j T + t - 1, except t = 0, which the
    # prompt's last column predicts for every completion.
    before = P + torch.arange(k * T, device=device) - 1
    before[::T] = P - 1
    where = batch.response_mask.nonzero()                             # (N, 2): sample row, response index
    group, j = where[:, 0] // k, where[:, 0] % k
    predictors = torch.stack([group, before[j * T + where[:, 1]]], 1)
    return _scored(model, batch, predictors, where, temperature, value_head, with_entropy,
                   lambda hidden: hidden[:, before].reshape(B, T, -1),
                   input_ids=torch.cat([prompts, batch.response_ids.reshape(G, k * T)], dim=1),
                   attention_mask=shared_prompt_attention(model, segment_ids),
                   position_ids=torch.cat([prompt_positions, response_positions], dim=1))
