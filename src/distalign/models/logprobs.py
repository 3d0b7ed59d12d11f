"""Log-probabilities of responses under a causal LM: the hot path of every objective.

    batch = collate_pairs(records, tok.pad_token_id)          # shared prompt: one row per pair
    out = pair_logps(model, batch)                            # out.chosen_logps, out.rejected_logps: (B,)

Conventions (docs/ARCHITECTURE.md): `token_logps[:, t] = log pi(input_ids[:, t] | input_ids[:, <t])`,
aligned with input_ids, zero outside the response; `logps = token_logps.sum(-1)`; fp32 even when the
model runs in bf16/fp16. Only `model(...)` is called, so PEFT and accelerate wrappers work.

Speed (PERFORMANCE.md): the label log-prob is `z_y - logsumexp(z)` computed over chunks of the logits
by a custom autograd function, so no fp32 (B, T, V) log-softmax copy is kept for backward; the LM
head skips prompt positions through `logits_to_keep` where the model accepts it; pairs share their
prompt in one row through a 4D mask (`shared_prompt_mask`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from .collate import CHOSEN, PAD, PROMPT, REJECTED, unshare_pairs
from .loading import unwrap_model

CHUNK_ELEMENTS = 1 << 24  # logits elements upcast at once: 64 MB of fp32
# Attention implementations that take a custom 4D mask as-is (transformers' masking_utils returns a 4D
# mask unchanged; sdpa wants bool, eager adds a float mask). Flash / flex kernels cannot: rows layout.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LabelLogProb(torch.autograd.Function):
    """log softmax(z / tau)[y] over the last dim, chunked along dim 1; labels < 0 give 0.

    Forward: z_y/tau - logsumexp(z/tau). Backward: d/dz_v = g * (1[v=y] - softmax(z/tau)_v) / tau,
    with the softmax recomputed per chunk, so nothing of size (B, T, V) is saved but the logits
    themselves. Both passes use torch's fused (log_)softmax kernels: on CPU they are several times
    faster than `logsumexp`, which runs as separate max / exp / sum passes.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, inv_temperature: float) -> Tensor:
        B, T, V = logits.shape
        dtype = _compute_dtype(logits.dtype)
        valid = labels >= 0
        safe_labels = labels.clamp_min(0).unsqueeze(-1)
        step = max(1, CHUNK_ELEMENTS // max(1, B * V))
        out = torch.empty((B, T), dtype=dtype, device=logits.device)
        for t0 in range(0, T, step):
            block = _scaled(logits[:, t0:t0 + step], dtype, inv_temperature)  # (B, t, V)
            out[:, t0:t0 + step] = block.log_softmax(-1).gather(-1, safe_labels[:, t0:t0 + step]).squeeze(-1)
        ctx.save_for_backward(logits, safe_labels, valid)
        ctx.inv_temperature, ctx.step, ctx.dtype = inv_temperature, step, dtype
        return out.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, safe_labels, valid = ctx.saved_tensors
        grad_out = (grad_out * valid).to(ctx.dtype).unsqueeze(-1)  # (B, T, 1)
        T, step = logits.shape[1], ctx.step
        if step >= T:  # one chunk: return it directly instead of copying it into a gradient buffer
            return _chunk_grad(logits, safe_labels, grad_out, ctx.dtype, ctx.inv_temperature), None, None
        grad = torch.empty_like(logits)
        for t0 in range(0, T, step):
            sl = slice(t0, t0 + step)
            grad[:, sl] = _chunk_grad(logits[:, sl], safe_labels[:, sl], grad_out[:, sl], ctx.dtype,
                                      ctx.inv_temperature)
        return grad, None, None


def _chunk_grad(logits: Tensor, safe_labels: Tensor, grad_out: Tensor, dtype: torch.dtype,
                inv_temperature: float) -> Tensor:
    """g * (onehot(y) - softmax(z / tau)) / tau for one chunk, in the logits' dtype."""
    probs = _scaled(logits, dtype, inv_temperature).softmax(-1)
    g = probs.mul_(-grad_out).scatter_add_(-1, safe_labels, grad_out)
    return (g.mul_(inv_temperature) if inv_temperature != 1.0 else g).to(logits.dtype)


def _scaled(block: Tensor, dtype: torch.dtype, inv_temperature: float) -> Tensor:
    block = block.to(dtype)
    return block * inv_temperature if inv_temperature != 1.0 else block


def token_logps_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-position log-prob of `labels` under softmax(logits / temperature), without shifting.

    logits (B, T, V) any float dtype, labels (B, T) long; returns (B, T) fp32 (fp64 for fp64 logits):
    `out[b, t] = log softmax(logits[b, t] / temperature)[labels[b, t]]`, and 0 where labels < 0
    (e.g. -100). The caller aligns labels (position t's logits predict token t+1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"token_logps_from_logits: logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} differ in (B, T)")
    return _LabelLogProb.apply(logits, labels, 1.0 / temperature)


@functools.cache
def _forward_accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _core_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / compile / PEFT wrappers (for signature and config checks)."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _model_logits(model, input_ids: Tensor, logits_from: int, **inputs) -> tuple[Tensor, int]:
    """Logits of positions `start..T-1` and `start` (= logits_from where the head can skip the rest)."""
    T = input_ids.shape[1]
    start = max(0, min(logits_from, T - 1))
    if start > 0 and _forward_accepts(type(_core_model(model)), "logits_to_keep"):
        inputs["logits_to_keep"] = T - start
    else:
        start = 0
    return model(input_ids=input_ids, use_cache=False, **inputs).logits, start


def _next_token_logps(logits: Tensor, input_ids: Tensor, start: int, temperature: float) -> Tensor:
    """(B, T) with position t = log p(input_ids[t] | <t) for t > start, 0 at t <= start.

    logits cover positions start..T-1; the last position predicts nothing and gets label -100,
    which keeps the logits unsliced (slicing them would cost a (B, T, V) copy in backward).
    """
    B = input_ids.shape[0]
    ignore = torch.full((B, 1), -100, dtype=input_ids.dtype, device=input_ids.device)
    labels = torch.cat([input_ids[:, start + 1:], ignore], dim=1)
    shifted = token_logps_from_logits(logits, labels, temperature)[:, :-1]  # predicts start+1..T-1
    head = torch.zeros((B, start + 1), dtype=shifted.dtype, device=shifted.device)
    return torch.cat([head, shifted], dim=1)


def _logits_from(batch: dict) -> int:
    if "logits_from" in batch:
        return int(batch["logits_from"])
    return int(batch["response_mask"].float().argmax(-1).min()) - 1  # a sync; collators precompute it


def sequence_logps(model, batch: dict, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Response log-probs of right-padded [prompt | response] rows (`collate_sequences`).

    logp(y|x) = sum_t log pi(y_t | x, y_<t), with logits divided by `temperature` before the softmax.
    Returns logps (B,), token_logps (B, T) aligned with input_ids and zero outside the response,
    lengths (B,) = number of response tokens.
    """
    input_ids, response_mask = batch["input_ids"], batch["response_mask"]
    logits, start = _model_logits(model, input_ids, _logits_from(batch), attention_mask=batch["attention_mask"])
    token_logps = _next_token_logps(logits, input_ids, start, temperature) * response_mask
    return token_logps.sum(-1), token_logps, response_mask.sum(-1)


@dataclass
class PairForward:
    """Policy log-probs of a batch of pairs; token tensors are (B, T), zero outside their response."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_token_logps: Tensor | None = None
    rejected_token_logps: Tensor | None = None


def shared_prompt_mask(segment_ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(B, 1, T, T) mask: query q sees key k <= q iff k is a prompt token or in q's own segment.

    Pad queries see only themselves, so no softmax row is empty (an empty row gives NaN). Returns bool
    (True = attend, for sdpa) or, given `dtype`, additive 0 / finfo.min (for eager attention).
    """
    T = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones((T, T), dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (key != PAD) & (query != PAD) & ((key == PROMPT) | (key == query))
    allowed = (allowed | torch.eye(T, dtype=torch.bool, device=segment_ids.device)).unsqueeze(1)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                        torch.finfo(dtype).min)


def supports_shared_prompt(model) -> bool:
    return getattr(_core_model(model).config, "_attn_implementation", None) in SHARED_PROMPT_ATTENTION


def shared_prompt_attention(model, segment_ids: Tensor) -> Tensor:
    """`shared_prompt_mask` in the form the model's attention takes (bool for sdpa, additive for eager)."""
    core = _core_model(model)
    eager = core.config._attn_implementation == "eager"
    return shared_prompt_mask(segment_ids, core.get_input_embeddings().weight.dtype if eager else None)


def _shared_pair_logps(model, batch: dict, temperature: float) -> PairForward:
    input_ids, segment_ids = batch["input_ids"], batch["segment_ids"]
    mask = shared_prompt_attention(model, segment_ids)
    logits, start = _model_logits(model, input_ids, batch["logits_from"], attention_mask=mask,
                                  position_ids=batch["position_ids"])
    token_logps = _next_token_logps(logits, input_ids, start, temperature)
    # The first rejected token follows the prompt, not the last chosen token: re-score it from the
    # logits of the prompt's last position.
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    prompt_end = batch["prompt_lengths"].to(input_ids.device)
    first_rejected = prompt_end + batch["chosen_lengths"].to(input_ids.device)
    first_logits = logits[rows, prompt_end - 1 - start].unsqueeze(1)  # (B, 1, V)
    first_logps = token_logps_from_logits(first_logits, input_ids[rows, first_rejected, None], temperature)
    token_logps = token_logps.index_put((rows, first_rejected), first_logps.squeeze(1))
    chosen_token_logps = token_logps * (segment_ids == CHOSEN)
    rejected_token_logps = token_logps * (segment_ids == REJECTED)
    return PairForward(chosen_token_logps.sum(-1), rejected_token_logps.sum(-1),
                       batch["chosen_lengths"].to(input_ids.device), batch["rejected_lengths"].to(input_ids.device),
                       chosen_token_logps, rejected_token_logps)


def pair_logps(model, batch: dict, temperature: float = 1.0) -> PairForward:
    """Chosen and rejected log-probs of a `collate_pairs` batch in either layout.

    A shared-layout batch runs as one row per pair when the model's attention takes a 4D mask
    (`SHARED_PROMPT_ATTENTION`), otherwise it is rebuilt as two rows per pair (same numbers, more tokens).
    """
    if "segment_ids" in batch:
        if supports_shared_prompt(model):
            return _shared_pair_logps(model, batch, temperature)
        batch = unshare_pairs(batch)
    logps, token_logps, lengths = sequence_logps(model, batch, temperature)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = token_logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return PairForward(chosen, rejected, chosen_lengths, rejected_lengths, chosen_tokens, rejected_tokens)
