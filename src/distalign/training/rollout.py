"""Rollouts: sample completions from the current policy, then score them in batched forwards.

    sampler = HFSampler(tokenizer, max_new_tokens=32, temperature=0.7)
    batch = sampler.sample(policy, prompt_ids)                  # KV-cache generate, left-padded prompts
    out = response_forward(policy, batch, temperature=0.7)      # token_logps (B, T) with logits / T

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

from distalign.models import token_logps_from_logits


@dataclass
class SampledBatch:
    input_ids: Tensor        # (B, P + T)
    attention_mask: Tensor   # (B, P + T) 1 on prompt and response tokens (EOS included)
    position_ids: Tensor     # (B, P + T)
    prompt_length: int       # P, the padded prompt width
    response_mask: Tensor    # (B, T) float
    truncated: Tensor        # (B,) bool: no EOS within max_new_tokens

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length:]

    def select(self, rows: Tensor) -> SampledBatch:
        return SampledBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                            self.prompt_length, self.response_mask[rows], self.truncated[rows])


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

    The LM head runs only on the last T + 1 positions (`logits_to_keep`); position P - 1 + t predicts
    response token t, so the last position's logits are unused and get label -100.
    """
    P, T = batch.prompt_length, batch.response_mask.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=T + 1, use_cache=False, output_hidden_states=value_head is not None)
    ignore = torch.full_like(batch.input_ids[:, :1], -100)
    labels = torch.cat([batch.response_ids.masked_fill(batch.response_mask == 0, -100), ignore], dim=1)
    token_logps = token_logps_from_logits(out.logits, labels, temperature)[:, :-1] * batch.response_mask
    values = entropy = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, P - 1:P + T - 1]) * batch.response_mask
    if with_entropy:
        with torch.no_grad():
            logits = out.logits[:, :-1].float() / temperature
            probs = torch.softmax(logits, -1)
            entropy = (torch.logsumexp(logits, -1) - (probs * logits).sum(-1)) * batch.response_mask
    return ResponseForward(token_logps, values, entropy)


class HFSampler:
    """Batched sampling with `model.generate` (KV cache), pure temperature sampling (top-k/top-p off
    unless asked; then the scored log-probs are those of the untruncated tempered distribution)."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0):
        from transformers import GenerationConfig
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if self.pad is None or self.eos is None:
            raise ValueError("tokenizer: needs both a pad and an EOS token for batched generation")
        self.config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                       max_new_tokens=max_new_tokens, pad_token_id=self.pad,
                                       eos_token_id=self.eos, bos_token_id=tokenizer.bos_token_id)

    @torch.no_grad()
    def sample(self, model, prompt_ids: Sequence[Sequence[int]]) -> SampledBatch:
        device = next(model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.pad)
        ids, mask = ids.to(device), mask.to(device)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=self.config)
        finally:
            model.train(was_training)
        return assemble_batch(ids, mask, out[:, ids.shape[1]:], self.eos)

    def sync_weights(self, model) -> None:
        """`generate` runs on the live policy, so there is nothing to copy."""


class VLLMSampler:
    """The same interface on a vLLM engine; the policy's weights are pushed into it after each update.

    Not exercised by the test suite (vLLM needs a GPU and is not a dependency); import-guarded.
    """

    def __init__(self, tokenizer, model_path: str, max_new_tokens: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ImportError("generation.backend=vllm needs the 'vllm' package (pip install vllm, GPU only); "
                              "use generation.backend=hf") from None
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization)
        self.params = SamplingParams(temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p,
                                     max_tokens=max_new_tokens, stop_token_ids=[self.eos])

    def sample(self, model, prompt_ids: Sequence[Sequence[int]]) -> SampledBatch:
        from vllm.inputs import TokensPrompt
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], self.params,
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
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((name, p.detach()) for name, p in model.state_dict().items())


def build_sampler(tokenizer, generation, model_path: str):
    """The sampler named by `generation.backend` ("hf" or "vllm")."""
    kwargs = {"max_new_tokens": generation.max_new_tokens, "temperature": generation.temperature,
              "top_k": generation.top_k, "top_p": generation.top_p}
    if generation.backend == "vllm":
        return VLLMSampler(tokenizer, model_path, **kwargs)
    return HFSampler(tokenizer, **kwargs)
