"""Log-probabilities of responses under a causal LM: the hot path of every objective.

    batch = collate_pairs(records, tok.pad_token_id)          # shared prompt: one row per pair
    out = pair_logps(model, batch)                            # out.chosen_logps, out.rejected_logps: (B,)

Conventions (docs/ARCHITECTURE.md): `token_logps[:, t] = log pi(input_ids[:, t] | input_ids[:, <t])`,
aligned with input_ids, zero outside the response; `logps = token_logps.sum(-1)`; fp32 even when the
model runs in bf16/fp16. Only `model(...)` is called, so PEFT and accelerate wrappers work.

Speed and precision (PERFORMANCE.md): every function here asks `position_logps` for the positions
whose logits it needs (response tokens only: no prompt or padding position reaches the head). For
models with a plain linear head it runs the body through `model(...)`, then the head itself in fp32,
fused with the log-softmax and the gather over chunks of rows (`_HeadLabelLogProb`): no (N, V) logits
tensor is kept, and a bf16 body (autocast or bf16 weights) still gives fp32 log-probs of fp32 logits.
Other models' logits are gathered over chunks by `_LabelLogProb` (no (B, T, V) log-softmax copy for
backward). Pairs share their prompt in one row through a 4D mask (`shared_prompt_mask`).
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


class _HeadLabelLogProb(torch.autograd.Function):
    """log softmax((h W^T + b) / tau)[y] for rows h of final hidden states, in fp32 whatever their dtype.

    The LM head, the log-softmax and the gather run together over chunks of rows, so no (N, V) logits
    tensor exists beyond one chunk (`CHUNK_ELEMENTS`), in fp32 or otherwise; backward recomputes each
    chunk's logits (one extra head matmul) and returns dL/dh = G W, dL/dW = G^T h with
    G = g (onehot(y) - softmax) / tau. Why (issue 15 §3): a bf16 head rounds logits of size ~20 to
    steps of 0.06-0.125, and summed over a response that is more than a first update's signal.
    Optionally also the entropy of each row's distribution (no grad).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
                entropy_out: list | None) -> Tensor:
        dtype = _compute_dtype(hidden.dtype)
        w = weight.to(dtype)
        step = max(1, CHUNK_ELEMENTS // w.shape[0])
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        entropy = torch.empty_like(out) if entropy_out is not None else None
        for i in range(0, hidden.shape[0], step):
            logp = _head_logits(hidden[i:i + step], w, bias, dtype, inv_temperature).log_softmax(-1)
            out[i:i + step] = logp.gather(-1, labels[i:i + step, None]).squeeze(-1)
            if entropy is not None:
                entropy[i:i + step] = -(logp.exp() * logp).sum(-1)
        if entropy_out is not None:
            entropy_out.append(entropy)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.inv_temperature, ctx.step = inv_temperature, step
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, labels = ctx.saved_tensors
        dtype = _compute_dtype(hidden.dtype)
        w = weight.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_b else None
        for i in range(0, hidden.shape[0], ctx.step):
            h = hidden[i:i + ctx.step].to(dtype)
            g = grad_out[i:i + ctx.step].to(dtype)[:, None]
            z = _head_logits(h, w, bias, dtype, ctx.inv_temperature).softmax(-1)
            z = z.mul_(-g).scatter_add_(-1, labels[i:i + ctx.step, None], g)
            if ctx.inv_temperature != 1.0:
                z.mul_(ctx.inv_temperature)
            with torch.autocast(hidden.device.type, enabled=False):
                if need_h:
                    grad_h[i:i + ctx.step] = z @ w
                if need_w:
                    grad_w.addmm_(z.t(), h)
            if need_b:
                grad_b += z.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def _head_logits(h: Tensor, w: Tensor, bias: Tensor | None, dtype: torch.dtype, inv_temperature: float) -> Tensor:
    with torch.autocast(h.device.type, enabled=False):  # autocast would run it in bf16, in backward too
        z = h.to(dtype) @ w.t()
    if bias is not None:
        z += bias.to(dtype)
    return z.mul_(inv_temperature) if inv_temperature != 1.0 else z


# Causal LMs whose forward computes logits as exactly `lm_head(last_hidden_state)`: no soft-capping or
# logit scale after the head, which the fused fp32 head would otherwise skip.
FP32_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2", "phi3", "smollm3")


def _fp32_head(model) -> torch.nn.Linear | None:
    """The plain linear LM head when `position_logps` may run it itself in fp32, else None: other
    architectures, a head that is wrapped (LoRA, quantised), sharded parameters (FSDP), which only
    exist in full inside the model's own forward, or forward hooks that may edit the logits."""
    core = _core_model(model)
    config = getattr(core, "config", None)
    if getattr(config, "model_type", None) not in FP32_HEAD_MODEL_TYPES or not hasattr(core, "get_decoder"):
        return None
    head = core.get_output_embeddings()
    if type(head) is not torch.nn.Linear or not _forward_accepts(type(core), "logits_to_keep"):
        return None
    if type(unwrap_model(model)).__name__ == "FullyShardedDataParallel" or any(
            type(p).__name__ == "DTensor" or p.shape != p.data.shape for p in head.parameters()):
        return None
    # A forward hook on the model (or the head) may edit the logits, which the model's forward must then make.
    wrappers = {id(m): m for m in (model, unwrap_model(model), core, head)}.values()
    if any(m._forward_hooks for m in wrappers) or head._forward_pre_hooks:
        return None
    return head


@dataclass
class PositionForward:
    """Log-probs (N,) of labels at chosen positions, fp32; entropies (N,) and final hidden states on request."""

    logps: Tensor
    entropy: Tensor | None = None
    hidden: Tensor | None = None   # (B, T, H) the last layer's (normed) hidden states


def position_logps(model, positions: Tensor, labels: Tensor, temperature: float = 1.0, *,
                   with_entropy: bool = False, with_hidden: bool = False, **inputs) -> PositionForward:
    """log softmax(logits[b, t] / temperature)[label] for each (b, t) in `positions` (N, 2), in fp32.

    One forward of `model(**inputs)`; positions may repeat (one position predicting several labels).
    Models with a plain linear head (`_fp32_head`) run the head only on those N rows, in fp32, fused
    with the log-softmax (`_HeadLabelLogProb`), even when the body runs in bf16 (autocast or bf16
    weights); others get the model's logits of the positions from the first one needed on.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    T = inputs["input_ids"].shape[1]
    head = _fp32_head(model)
    if head is not None:
        hidden = _final_hidden(model, inputs)
        rows = hidden.flatten(0, 1).index_select(0, positions[:, 0] * T + positions[:, 1])
        entropies = [] if with_entropy else None
        logps = _HeadLabelLogProb.apply(rows, head.weight, head.bias, labels, 1.0 / temperature, entropies)
        return PositionForward(logps, entropies[0] if with_entropy else None, hidden if with_hidden else None)
    start = int(positions[:, 1].min()) if len(positions) else T - 1
    if start > 0 and _forward_accepts(type(_core_model(model)), "logits_to_keep"):
        inputs["logits_to_keep"] = T - start
    else:
        start = 0
    out = model(**inputs, use_cache=False, output_hidden_states=with_hidden)
    logits = out.logits.flatten(0, 1).index_select(0, positions[:, 0] * (T - start) + positions[:, 1] - start)
    logps = token_logps_from_logits(logits[None], labels[None], temperature)[0]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            log_probs = (logits.float() / temperature).log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
    return PositionForward(logps, entropy, out.hidden_states[-1] if with_hidden else None)


def _final_hidden(model, inputs: dict) -> Tensor:
    """(B, T, H) output of the model's decoder (after its final norm), from a forward through `model`
    itself (so DDP and PEFT wrappers see it) that asks its head for no position at all."""
    decoder = _core_model(model).get_decoder()
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long,
                                                                     device=inputs["input_ids"].device))
    finally:
        handle.remove()
    return captured[-1]


def scatter_positions(values: Tensor, positions: Tensor, shape: tuple) -> Tensor:
    """(B, T) zeros with `values` (N,) at `positions` (N, 2) (differentiable)."""
    return values.new_zeros(shape).index_put((positions[:, 0], positions[:, 1]), values)


def sequence_logps(model, batch: dict, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Response log-probs of right-padded [prompt | response] rows (`collate_sequences`).

    logp(y|x) = sum_t log pi(y_t | x, y_<t), with logits divided by `temperature` before the softmax.
    Returns logps (B,), token_logps (B, T) aligned with input_ids and zero outside the response,
    lengths (B,) = number of response tokens.
    """
    input_ids, response_mask = batch["input_ids"], batch["response_mask"]
    targets = response_mask.clone()
    targets[:, 0] = False  # position 0 has no predictor
    where = targets.nonzero()
    out = position_logps(model, where - where.new_tensor([0, 1]), input_ids[where[:, 0], where[:, 1]], temperature,
                         input_ids=input_ids, attention_mask=batch["attention_mask"])
    token_logps = scatter_positions(out.logps, where, input_ids.shape)
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
    # Each chosen / rejected token is predicted by the position before it, except the first rejected
    # token, which follows the prompt: the prompt's last position predicts it.
    where = ((segment_ids == CHOSEN) | (segment_ids == REJECTED)).nonzero()
    rows = where[:, 0]
    prompt_end = batch["prompt_lengths"].to(input_ids.device)[rows]
    first_rejected = where[:, 1] == prompt_end + batch["chosen_lengths"].to(input_ids.device)[rows]
    before = torch.where(first_rejected, prompt_end - 1, where[:, 1] - 1)
    out = position_logps(model, torch.stack([rows, before], 1), input_ids[rows, where[:, 1]], temperature,
                         input_ids=input_ids, attention_mask=shared_prompt_attention(model, segment_ids),
                         position_ids=batch["position_ids"])
    token_logps = scatter_positions(out.logps, where, input_ids.shape)
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
