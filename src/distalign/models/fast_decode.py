"""A lean one-token decode step for Llama-family causal LMs (llama, mistral, qwen2) on a reserved KV cache.

    decoder = LlamaDecoder.build(model, prefill_cache, rows, prompt_mask, extra=64)   # None: unsupported
    logits = decoder(tokens, positions)        # (B,) drawn tokens, (B,) their positions -> (B, V) logits

Why (PERFORMANCE.md, "Online"): on small models a decode step through `model(...)` spends as much time in
transformers' per-call machinery (mask and cache objects, separate q/k/v and gate/up matmuls, an SDPA
kernel built for long queries: about 0.5 ms per call for one query on this CPU) as in the arithmetic.
This does the same arithmetic with fewer ops:
- one matmul for q|k|v and one for gate|up per layer, every matmul on oneDNN for fp32 CPU inputs
  (`onednn.linear`: the shapes repeat at every step, so its compiled kernels are reused);
- RoPE on q and k together;
- the new tokens' keys and values in buffers reserved for the whole completion, written in place;
- a prompt's keys and values kept once for the k rows that sample from it (GRPO's group), read by
  all k rows' queries in one matmul: decode attention is memory-bound, and the prompt is most of it;
- one query's attention as batched matmuls over grouped KV heads (no `repeat_kv` copy);
- the padding mask built once.
Measured on the tiny benchmark model (32 rows): 11.8 -> 8.8 ms per decode step; sharing the prompt,
11.7 -> 9.3 ms with 180-token prompts (same with 30-token ones).

It reads the live weights at `build` (the fused q|k|v and gate|up copies are taken then, once per
rollout, so an optimizer step between rollouts is always seen). `build` returns None for anything it
does not reproduce exactly, and the caller keeps the model's own forward: other architectures, LoRA or
quantised layers, q/k norms, partial rotary embeddings, a sliding window shorter than the sequence, a cache without per-layer
key/value tensors, forward hooks on any module. Tests compare its logits with the model's forward
(llama, qwen2 with biases, GQA with rope scaling, mistral).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .onednn import linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Fusing q|k|v and gate|up copies about 2/3 of the weights once per rollout: worth it where the per-op
# overhead dominates (small models, CPU), not for a large model whose memory is the limit.
FUSE_MAX_PARAMETERS = 200_000_000


def _is_plain_linear(module) -> bool:
    return type(module) is nn.Linear


def _supported_layer(layer, total_length: int, config) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if (attn is None or mlp is None or hasattr(attn, "q_norm") or hasattr(attn, "k_norm")
            or not isinstance(getattr(attn, "scaling", None), float)):
        return False
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(_is_plain_linear(p) for p in projections) or not hasattr(mlp, "act_fn"):
        return False
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    if not all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms):
        return False
    window = getattr(attn, "sliding_window", None)
    if window is None and config.model_type == "mistral":
        window = getattr(config, "sliding_window", None)
    return window is None or window >= total_length


def _apply(layer: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, layer.weight, layer.bias)


def _rms_norm(x: Tensor, norm) -> Tensor:
    """transformers' Llama RMSNorm, op for op: statistics in fp32, weight applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


class _Concatenated:
    """Linears of one input with their outputs concatenated: one matmul on fused weights, or one per layer.

    (A class, not a lambda on `_Layer`: a closure over the layer would make a reference cycle that keeps
    each rollout's cache alive until the garbage collector runs.)
    """

    def __init__(self, layers: tuple[nn.Linear, ...], fuse: bool):
        self.layers, self.weight, self.bias = layers, None, None
        if fuse:
            with torch.no_grad():
                self.weight = torch.cat([layer.weight for layer in layers])
                if layers[0].bias is not None:
                    self.bias = torch.cat([layer.bias for layer in layers])

    def __call__(self, x: Tensor) -> Tensor:
        if self.weight is not None:
            return linear(x, self.weight, self.bias)
        return torch.cat([_apply(layer, x) for layer in self.layers], dim=-1)


class _Layer:
    """One decoder layer's weights in decode form, the prompts' keys / values (U, KVH, P, D), read in
    place, one per group of k rows that share a prompt, and the rows' own reserved keys / values
    (U, KVH, k, extra, D), written one column per step."""

    def __init__(self, layer, prompt_keys: Tensor, prompt_values: Tensor, group_size: int, extra: int, fuse: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.o_proj, self.down_proj, self.act = attn.o_proj, mlp.down_proj, mlp.act_fn
        self.scaling = attn.scaling
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.split = [p.out_features for p in qkv]
        self.qkv, self.gate_up = _Concatenated(qkv, fuse), _Concatenated((mlp.gate_proj, mlp.up_proj), fuse)
        self.prompt_keys, self.prompt_values = prompt_keys.contiguous(), prompt_values.contiguous()
        U, KVH, _, D = prompt_keys.shape
        self.keys = prompt_keys.new_empty((U, KVH, group_size, extra, D))
        self.values = prompt_values.new_empty((U, KVH, group_size, extra, D))

    def __call__(self, h: Tensor, cos: Tensor, sin: Tensor, prompt_mask: Tensor, step: int) -> Tensor:
        U, KVH, k, _, D = self.keys.shape
        B, P, H = h.shape[0], self.prompt_keys.shape[2], self.split[0] // D
        n = H // KVH  # query heads per KV head; query head h reads KV head h // n, as transformers' repeat_kv
        qkv = self.qkv(_rms_norm(h, self.attn_norm))                        # (B, (H + 2 KVH) D)
        q_and_k = qkv[:, :self.split[0] + self.split[1]].view(B, -1, D)    # RoPE on q and k at once
        half = D // 2
        rotated = torch.cat([-q_and_k[..., half:], q_and_k[..., :half]], dim=-1)
        q_and_k = q_and_k * cos + rotated * sin
        self.keys[:, :, :, step] = q_and_k[:, H:].view(U, k, KVH, D).transpose(1, 2)
        self.values[:, :, :, step] = qkv[:, self.split[0] + self.split[1]:].view(U, k, KVH, D).transpose(1, 2)
        # A group's k rows query its prompt together: one (k n, D) x (D, P) matmul per KV head.
        query = q_and_k[:, :H].reshape(U, k, KVH, n, D).transpose(1, 2).reshape(U, KVH, k * n, D) * self.scaling
        prompt_scores = torch.matmul(query, self.prompt_keys.transpose(-1, -2)) + prompt_mask
        own_scores = torch.matmul(query.view(U, KVH, k, n, D), self.keys[:, :, :, :step + 1].transpose(-1, -2))
        probs = torch.cat([prompt_scores.view(U, KVH, k, n, P), own_scores], dim=-1)
        probs = probs.softmax(-1, dtype=torch.float32).to(self.values.dtype)          # (U, KVH, k, n, P + step + 1)
        from_prompt = torch.matmul(probs[..., :P].view(U, KVH, k * n, P), self.prompt_values)
        attended = h.new_empty((U, k, KVH, n, D))
        torch.add(from_prompt.view(U, KVH, k, n, D), torch.matmul(probs[..., P:], self.values[:, :, :, :step + 1]),
                  out=attended.transpose(1, 2))
        h = h + _apply(self.o_proj, attended.view(B, H * D))
        gate, up = self.gate_up(_rms_norm(h, self.mlp_norm)).chunk(2, dim=-1)
        return h + _apply(self.down_proj, self.act(gate) * up)


class LlamaDecoder:
    """Next-token logits of one new token per row, from a prefilled cache; see the module docstring."""

    def __init__(self, model, layers: list[_Layer], prompt_mask: Tensor):
        self.embed, self.rotary = model.model.embed_tokens, model.model.rotary_emb
        self.norm, self.lm_head = model.model.norm, model.lm_head
        self.layers, self.prompt_mask, self.step = layers, prompt_mask, 0

    @classmethod
    def build(cls, model, cache, rows: Tensor, prompt_mask: Tensor, extra: int) -> LlamaDecoder | None:
        """From the prefill's cache (one entry per distinct prompt) for rows of those prompts; None when
        unsupported. Rows in equal runs per prompt, in order (`rows` = 0,0,..,1,1,..), read each prompt's
        keys and values in place; any other `rows` get a copy per row.

        prompt_mask: (U, P) 1 for real prompt tokens, 0 for left padding, one row per distinct prompt.
        """
        config = getattr(model, "config", None)
        core = getattr(model, "model", None)
        if (config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES
                or core is None or not hasattr(core, "rotary_emb") or not _is_plain_linear(model.lm_head)):
            return None
        cache_layers = getattr(cache, "layers", None)
        P = prompt_mask.shape[1]
        if not cache_layers or len(cache_layers) != len(core.layers) or not all(
                isinstance(getattr(c, "keys", None), Tensor) and c.keys.shape[-2] == P for c in cache_layers):
            return None
        if not all(_supported_layer(layer, P + extra, config) for layer in core.layers):
            return None
        inv_freq = getattr(core.rotary_emb, "inv_freq", None)
        if not isinstance(inv_freq, Tensor) or 2 * inv_freq.numel() != cache_layers[0].keys.shape[-1]:
            return None  # partial rotary: RoPE covers only part of each head
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return None  # hooks (logit edits, probes) only run inside the model's own forward
        fuse = sum(p.numel() for p in model.parameters()) <= FUSE_MAX_PARAMETERS
        U, B = prompt_mask.shape[0], len(rows)
        group_size = B // U
        prompts = [(c.keys, c.values) for c in cache_layers]
        if B % U or not torch.equal(rows, torch.arange(U, device=rows.device).repeat_interleave(group_size)):
            # Rows that are not equal runs of each prompt in order: one prompt copy per row.
            group_size, prompt_mask = 1, prompt_mask.index_select(0, rows)
            prompts = [(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in prompts]
        layers = [_Layer(layer, keys, values, group_size, extra, fuse)
                  for layer, (keys, values) in zip(core.layers, prompts)]
        dtype = layers[0].keys.dtype
        additive = torch.zeros(prompt_mask.shape, dtype=dtype, device=prompt_mask.device)
        additive = additive.masked_fill_(prompt_mask == 0, torch.finfo(dtype).min)[:, None, None, :]  # (U, 1, 1, P)
        return cls(model, layers, additive)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits (B, V) after feeding `tokens` (B,) at `positions` (B,); writes the next cache column."""
        if self.step >= self.layers[0].keys.shape[3]:
            raise RuntimeError("LlamaDecoder: the reserved cache is full")
        h = self.embed(tokens)                                               # (B, hidden)
        cos, sin = self.rotary(h[:, None], positions[:, None])              # (B, 1, D): rope scaling included
        for layer in self.layers:
            h = layer(h, cos, sin, self.prompt_mask, self.step)
        self.step += 1
        return _apply(self.lm_head, _rms_norm(h, self.norm))
