"""Samplers: draw completions from the current policy; one interface, three backends.

    sampler = build_sampler(tokenizer, cfg.generation, model_path)
    batch = sampler.sample(policy, [prompt_ids] * k + [other_prompt_ids] * k)   # a SampledBatch

- "hf" (`CachedSampler`, the default): our own decode loop on the model's KV cache. Consecutive rows
  with the same prompt (a group of k samples) share one prefill, the cache is reserved once for the
  whole completion and filled in place, and every step's log-prob and entropy of the tempered
  distribution are kept, so a single-update rollout needs no scoring forward of the policy. Llama,
  Mistral and Qwen2 decode through `models.fast_decode.LlamaDecoder` (same logits, fewer ops).
- "generate" (`GenerateSampler`): `model.generate`, for models whose cache our loop does not handle.
- "vllm" (`VLLMSampler`): a vLLM engine, weights pushed after each update (GPU only, import-guarded).

`MixtureSampler` (Nash-MD's opponent) runs `CachedSampler`'s loop on the policy and the reference at
once and draws from their per-token geometric mixture, behind the same interface:
`MixtureSampler(tokenizer, 0.125, reference.context, max_new_tokens=64, temperature=1.0).sample(policy, ids)`.

All three sample from softmax(logits / T) with optional top-k / top-p; log-probs stored or scored later
are those of the untruncated tempered distribution, so the two always agree (tests).
Why our own loop (PERFORMANCE.md, "Online"): on small models `generate` spends most of each decode
step outside the model, and DynamicCache copies the whole cache at every step (a `torch.cat` per layer).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from distalign.models import evaluating, merged_state_dict, unwrap_model
from distalign.models.fast_decode import LlamaDecoder
from distalign.objectives import geometric_mixture

from .rollout import SampledBatch, assemble_batch, entropy_of, left_pad

# transformers 5 renamed the KV cache argument and output `past_key_values` -> `cache` (the old name
# warns); the rename is per release, so one model class tells which name this installation takes.
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def filter_logits(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """Tempered logits (B, V) with everything outside the top-k / the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scaled.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p        # the first token is always kept
        scaled = scaled.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return scaled


def _groups(prompt_ids: Sequence[Sequence[int]]) -> tuple[list, list[int]]:
    """Unique prompts (runs of equal consecutive rows) and each row's index among them."""
    unique, row_group = [], []
    for i, prompt in enumerate(prompt_ids):
        if i == 0 or list(prompt) != list(prompt_ids[i - 1]):
            unique.append(prompt)
        row_group.append(len(unique) - 1)
    return unique, row_group


def _reserve_cache(cache, rows: Tensor, extra: int):
    """The prefill cache copied to `rows` (one entry per sample) with room for `extra` positions.

    transformers >= 5 DynamicCache: every layer becomes a `ReservedLayer` (in-place writes). Other caches
    (sliding-window layers, older transformers) are only re-indexed and keep their own update.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        DynamicLayer = None
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        cache.reorder_cache(rows)
        return cache
    reserved_layer = _reserved_layer_class(DynamicLayer)
    cache.layers = [reserved_layer(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), extra)
                    for layer in layers]
    return cache


@functools.cache  # one class per base, not one per sampled batch
def _reserved_layer_class(base: type) -> type:
    class ReservedLayer(base):
        """A DynamicLayer whose keys/values live in a buffer reserved for the whole completion: `update`
        writes the new positions in place and returns views, instead of concatenating a new copy."""

        def __init__(self, keys: Tensor, values: Tensor, extra: int):
            super().__init__()
            B, H, L, _ = keys.shape
            self._keys = keys.new_empty((B, H, L + extra, keys.shape[-1]))
            self._values = values.new_empty((B, H, L + extra, values.shape[-1]))
            self._keys[:, :, :L], self._values[:, :, :L] = keys, values
            self.length, self.dtype, self.device, self.is_initialized = L, keys.dtype, keys.device, True
            self.keys, self.values = self._keys[:, :, :L], self._values[:, :, :L]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            end = self.length + key_states.shape[-2]
            self._keys[:, :, self.length:end] = key_states
            self._values[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

    return ReservedLayer


class _ModelStep:
    """One decode step through the model's own forward, on the prefill cache reserved by `_reserve_cache`."""

    def __init__(self, forward, cache, rows: Tensor, prompt_mask: Tensor, extra: int):
        self.forward, self.cache = forward, _reserve_cache(cache, rows, extra)
        self.attention = torch.cat([prompt_mask.index_select(0, rows), prompt_mask.new_ones((len(rows), extra))], 1)
        self.length = prompt_mask.shape[1]

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.length += 1
        return self.forward(input_ids=tokens[:, None], attention_mask=self.attention[:, :self.length],
                            position_ids=positions[:, None], use_cache=True, **{CACHE: self.cache}).logits[:, -1]


class CachedSampler:
    """Temperature sampling with our own KV-cache decode loop (backend "hf"); see the module docstring.

    `min_new_tokens` forbids EOS before that many tokens (the stored log-probs stay those of the
    unrestricted distribution, like the scoring forward's). `fast_decode` runs the decode steps of
    Llama-family models through `LlamaDecoder` (same arithmetic, fewer ops); other models, and
    `fast_decode=False`, step through the model's own forward.
    """

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 min_new_tokens: int = 0, fast_decode: bool = True):
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if self.pad is None or self.eos is None:
            raise ValueError("tokenizer: needs both a pad and an EOS token for batched generation")
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.top_k, self.top_p, self.min_new_tokens = top_k, top_p, min_new_tokens
        self.fast_decode = fast_decode

    def choose(self, scaled: Tensor, step: int, uniform: Tensor | None = None) -> Tensor:
        """Next tokens (B,) drawn from tempered logits (B, V) after the EOS ban and top-k / top-p, by
        inverse CDF with one uniform per row (`uniform` (B,), else drawn from torch's global RNG)."""
        if step < self.min_new_tokens:
            scaled = scaled.clone()
            scaled[:, self.eos] = float("-inf")
        # One uniform per row (torch.multinomial draws one exponential per vocabulary entry); the cumulative
        # sum in float64 so that tokens far below 1e-7 keep their probability in large vocabularies.
        cdf = filter_logits(scaled, self.top_k, self.top_p).softmax(-1).cumsum(-1, dtype=torch.float64)
        if uniform is None:
            uniform = torch.rand(cdf.shape[0], device=cdf.device)
        target = uniform.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)

    @torch.no_grad()
    def sample(self, model, prompt_ids: Sequence[Sequence[int]], uniforms: Tensor | None = None) -> SampledBatch:
        """Completions of each row's prompt. `uniforms` (B, max_new_tokens) in [0, 1), when given, are
        the draws (row b's token t is the inverse CDF at uniforms[b, t]): a trainer that cuts them from
        one draw per global batch samples the same tokens whatever the number of processes."""
        return self._sample(model, [model], prompt_ids, uniforms)

    def distribution(self, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(what `choose` draws from, its log-probs) at one step, from each forward's last logits (B, V)."""
        scaled = logits[0].float() / self.temperature
        return scaled, scaled.log_softmax(-1)

    def _sample(self, model, forwards: list, prompt_ids: Sequence[Sequence[int]],
                uniforms: Tensor | None = None) -> SampledBatch:
        device = next(model.parameters()).device
        unique, row_group = _groups(prompt_ids)
        ids, mask = (t.to(device) for t in left_pad(unique, self.pad))
        rows = torch.tensor(row_group, device=device)
        with evaluating(model):
            tokens, logps, entropies = self._decode(forwards, ids, mask, rows, uniforms)
        batch = assemble_batch(ids.index_select(0, rows), mask.index_select(0, rows), tokens, self.eos)
        batch.token_logps = logps * batch.response_mask
        batch.entropy = entropies * batch.response_mask
        return batch

    def _decode(self, forwards: list, ids: Tensor, mask: Tensor, rows: Tensor,
                uniforms: Tensor | None = None) -> tuple[Tensor, ...]:
        """Decode with every forward in lockstep, each on its own reserved cache, all fed the token drawn
        from `distribution` of their logits. One forward for plain sampling, two for a mixture."""
        steps, logits = [], []
        for forward in forwards:
            out = forward(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=True, logits_to_keep=1)
            steps.append(self._decode_step(forward, getattr(out, CACHE), rows, mask))
            logits.append(out.logits[:, -1].index_select(0, rows))
        next_position = mask.index_select(0, rows).sum(-1)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=ids.device)
        tokens, logps, entropies = [], [], []
        for i in range(self.max_new_tokens):
            scaled, log_probs = self.distribution(logits)
            token = self.choose(scaled, i, None if uniforms is None else uniforms[:, i]).masked_fill(finished, self.pad)
            tokens.append(token)
            logps.append(log_probs.gather(-1, token[:, None])[:, 0])
            entropies.append(entropy_of(log_probs))
            finished |= token == self.eos
            if i + 1 == self.max_new_tokens or bool(finished.all()):  # one host sync per step, as generate
                break
            logits = [step(token, next_position + i) for step in steps]
        return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(entropies, 1)

    def _decode_step(self, forward, cache, rows: Tensor, mask: Tensor):
        """One forward's decode step: the lean Llama-family step where it applies, else the model's forward."""
        lean = (LlamaDecoder.build(unwrap_model(forward), cache, rows, mask, self.max_new_tokens)
                if self.fast_decode else None)
        return lean or _ModelStep(forward, cache, rows, mask, self.max_new_tokens)

    def sync_weights(self, model) -> None:
        """Sampling runs on the live policy, so there is nothing to copy."""


class MixtureSampler(CachedSampler):
    """Nash-MD's opponent (Munos et al. 2024, Sec. 7): y' drawn token by token from the geometric mixture

        pi_mix(. | x, y'_<t) ∝ pi(. | x, y'_<t)^(1 - beta) pi_ref(. | x, y'_<t)^beta   (both at temperature T)

    with the policy and the reference decoded in lockstep on two caches, both fed the drawn token. The
    sequence-level mixture pi^(1-beta) pi_ref^beta / Z is intractable to sample; this per-token
    renormalised one is the paper's practical stand-in. Stored `token_logps` / `entropy` are the mixture's.
    It is this loop whatever `generation.backend` says: `generate` and vLLM cannot mix two models per token.
    """

    def __init__(self, tokenizer, mixture: float, reference_context, max_new_tokens: int, temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, fast_decode: bool = True):
        """`reference_context()` yields the reference module (`ReferenceModel.context`)."""
        super().__init__(tokenizer, max_new_tokens, temperature, top_k, top_p, min_new_tokens, fast_decode)
        self.mixture, self.reference_context = mixture, reference_context

    def distribution(self, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        policy, ref = ((z.float() / self.temperature).log_softmax(-1) for z in logits)
        mixed = geometric_mixture(policy, ref, self.mixture)
        return mixed, mixed

    @torch.no_grad()
    def sample(self, model, prompt_ids: Sequence[Sequence[int]], uniforms: Tensor | None = None) -> SampledBatch:
        with self.reference_context() as ref:
            if unwrap_model(ref) is not unwrap_model(model):  # a frozen copy: decoded as a model of its own
                return self._sample(model, [model, ref], prompt_ids, uniforms)

        # A LoRA policy's reference is the same module with the adapter off: the context is entered per forward.
        def reference(**inputs):
            with self.reference_context() as ref:
                return ref(**inputs)
        return self._sample(model, [model, reference], prompt_ids, uniforms)


@contextlib.contextmanager
def _rng_seeded_by(uniforms: Tensor | None, device: torch.device):
    """torch's RNG (CPU and `device`) forked and seeded from the first row's draws (`row_seeds`); left
    alone when there are none."""
    if uniforms is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(row_seeds(uniforms[:1])[0])
        yield


def row_seeds(uniforms: Tensor) -> list[int]:
    """One 48-bit seed per row of draws in [0, 1): its first two values hold 24 random bits each (fp32)."""
    bits = (uniforms[:, :2].double().cpu() * 2 ** 24).long().tolist()
    return [sum(v << (24 * i) for i, v in enumerate(row)) for row in bits]


class GenerateSampler:
    """Batched sampling with `model.generate` (backend "generate"); log-probs come from a scoring forward."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 min_new_tokens: int = 0):
        from transformers import GenerationConfig
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if self.pad is None or self.eos is None:
            raise ValueError("tokenizer: needs both a pad and an EOS token for batched generation")
        self.config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       pad_token_id=self.pad, eos_token_id=self.eos,
                                       bos_token_id=tokenizer.bos_token_id)

    @torch.no_grad()
    def sample(self, model, prompt_ids: Sequence[Sequence[int]], uniforms: Tensor | None = None) -> SampledBatch:
        """`generate` draws from torch's RNG; given `uniforms`, from a forked RNG seeded with their first two
        values (so a trainer's per-step, per-process draws still decide the sample, though not token by token)."""
        device = next(model.parameters()).device
        ids, mask = (t.to(device) for t in left_pad(prompt_ids, self.pad))
        with evaluating(model), _rng_seeded_by(uniforms, device):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=self.config)
        return assemble_batch(ids, mask, out[:, ids.shape[1]:], self.eos)

    def sync_weights(self, model) -> None:
        """`generate` runs on the live policy, so there is nothing to copy."""


class VLLMSampler:
    """The same interface on a vLLM engine; the policy's weights are pushed into it after each update.

    Each request is seeded from its row's draws (`row_seeds`), so a run resumes with the same samples
    and the processes of a run draw differently, as with the other backends. A LoRA policy is pushed
    with its adapter folded in, under the base model's names (`merged_state_dict`). Not exercised
    against a real engine by the test suite (vLLM needs a GPU and is not a dependency); import-guarded.
    """

    def __init__(self, tokenizer, model_path: str, max_new_tokens: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, min_new_tokens: int = 0, gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ImportError("generation.backend=vllm needs the 'vllm' package (pip install vllm, GPU only); "
                              "use generation.backend=hf") from None
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization)
        self.sampling_params = functools.partial(
            SamplingParams, temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p,
            max_tokens=max_new_tokens, min_tokens=min_new_tokens, stop_token_ids=[self.eos])

    def sample(self, model, prompt_ids: Sequence[Sequence[int]], uniforms: Tensor | None = None) -> SampledBatch:
        from vllm.inputs import TokensPrompt
        params = ([self.sampling_params(seed=seed) for seed in row_seeds(uniforms)] if uniforms is not None
                  else self.sampling_params())
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        width = max(1, max(len(r) for r in responses))
        response_ids = torch.full((len(responses), width), self.pad, dtype=torch.long)
        for row, r in enumerate(responses):
            response_ids[row, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        ids, mask = left_pad(prompt_ids, self.pad)
        device = next(model.parameters()).device
        return assemble_batch(ids.to(device), mask.to(device), response_ids.to(device), self.eos)

    def sync_weights(self, model) -> None:
        weights = merged_state_dict(model)
        engine_model(self.llm).load_weights(weights.items())


def engine_model(llm):
    """The model inside an in-process vLLM engine: the V0 engine's driver worker, or the V1 engine's
    when it runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    worker = ("llm_engine", "model_executor", "driver_worker")
    for path in (worker + ("model_runner", "model"), worker + ("worker", "model_runner", "model")):
        found = llm
        for attribute in path:
            found = getattr(found, attribute, None)
        if found is not None:
            return found
    raise RuntimeError("vllm: cannot reach the engine's model to push the policy's weights (this vLLM "
                       "version runs it out of process; set VLLM_ENABLE_V1_MULTIPROCESSING=0)")


def sampler_options(generation) -> dict:
    """The keyword arguments every sampler takes, from a `GenerationConfig`."""
    return {"max_new_tokens": generation.max_new_tokens, "temperature": generation.temperature,
            "top_k": generation.top_k, "top_p": generation.top_p, "min_new_tokens": generation.min_new_tokens}


def build_sampler(tokenizer, generation, model_path: str):
    """The sampler named by `generation.backend` ("hf", "generate" or "vllm")."""
    kwargs = sampler_options(generation)
    if generation.backend == "vllm":
        return VLLMSampler(tokenizer, model_path, **kwargs)
    if generation.backend == "generate":
        return GenerateSampler(tokenizer, **kwargs)
    return CachedSampler(tokenizer, fast_decode=generation.fast_decode, **kwargs)
