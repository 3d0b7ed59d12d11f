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
- the cache in two buffers per layer, reserved for the whole completion and written in place;
- one query's attention as two batched matmuls over grouped KV heads (no `repeat_kv` copy);
- the padding mask built once.
Measured on the tiny benchmark model (32 rows): 11.8 -> 8.8 ms per decode step.

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
    """One decoder layer's weights in decode form, and its reserved keys / values (B, KVH, P + extra, D)."""

    def __init__(self, layer, keys: Tensor, values: Tensor, extra: int, fuse: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.o_proj, self.down_proj, self.act = attn.o_proj, mlp.down_proj, mlp.act_fn
        self.scaling = attn.scaling
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.split = [p.out_features for p in qkv]
        self.qkv, self.gate_up = _Concatenated(qkv, fuse), _Concatenated((mlp.gate_proj, mlp.up_proj), fuse)
        B, KVH, P, D = keys.shape
        self.keys = keys.new_empty((B, KVH, P + extra, D))
        self.values = values.new_empty((B, KVH, P + extra, D))
        self.keys[:, :, :P], self.values[:, :, :P] = keys, values

    def __call__(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, column: int) -> Tensor:
        B, KVH, _, D = self.keys.shape
        qkv = self.qkv(_rms_norm(h, self.attn_norm))                        # (B, (H + 2 KVH) D)
        q_and_k = qkv[:, :self.split[0] + self.split[1]].view(B, -1, D)    # RoPE on q and k at once
        half = D // 2
        rotated = torch.cat([-q_and_k[..., half:], q_and_k[..., :half]], dim=-1)
        q_and_k = q_and_k * cos + rotated * sin
        H = self.split[0] // D
        self.keys[:, :, column] = q_and_k[:, H:]
        self.values[:, :, column] = qkv[:, self.split[0] + self.split[1]:].view(B, KVH, D)
        keys, values = self.keys[:, :, :column + 1], self.values[:, :, :column + 1]
        # Query head h reads KV head h // (H / KVH), as transformers' repeat_kv orders them.
        query = q_and_k[:, :H].reshape(B, KVH, H // KVH, D) * self.scaling
        scores = torch.matmul(query, keys.transpose(-1, -2)) + mask[:, :, :, :column + 1]
        probs = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
        h = h + _apply(self.o_proj, torch.matmul(probs, values).reshape(B, H * D))
        gate, up = self.gate_up(_rms_norm(h, self.mlp_norm)).chunk(2, dim=-1)
        return h + _apply(self.down_proj, self.act(gate) * up)


class LlamaDecoder:
    """Next-token logits of one new token per row, from a prefilled cache; see the module docstring."""

    def __init__(self, model, layers: list[_Layer], mask: Tensor, prompt_length: int):
        self.embed, self.rotary = model.model.embed_tokens, model.model.rotary_emb
        self.norm, self.lm_head = model.model.norm, model.lm_head
        self.layers, self.mask, self.column = layers, mask, prompt_length

    @classmethod
    def build(cls, model, cache, rows: Tensor, prompt_mask: Tensor, extra: int) -> LlamaDecoder | None:
        """From the prefill's cache (one entry per distinct prompt), copied to `rows`; None when unsupported.

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
        layers = [_Layer(layer, c.keys.index_select(0, rows), c.values.index_select(0, rows), extra, fuse)
                  for layer, c in zip(core.layers, cache_layers)]
        dtype = layers[0].keys.dtype
        allowed = torch.cat([prompt_mask.index_select(0, rows).bool(),
                             prompt_mask.new_ones((len(rows), extra), dtype=torch.bool)], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, None, :]   # (B, 1, 1, P + extra)
        return cls(model, layers, mask, P)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits (B, V) after feeding `tokens` (B,) at `positions` (B,); writes the next cache column."""
        if self.column >= self.layers[0].keys.shape[2]:
            raise RuntimeError("LlamaDecoder: the reserved cache is full")
        h = self.embed(tokens)                                               # (B, hidden)
        cos, sin = self.rotary(h[:, None], positions[:, None])              # (B, 1, D): rope scaling included
        for layer in self.layers:
            h = layer(h, cos, sin, self.mask, self.column)
        self.column += 1
        return _apply(self.lm_head, _rms_norm(h, self.norm))
