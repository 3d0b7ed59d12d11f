"""Reward-model scores, formatted exactly as the reward trainer sees its data.

Training, the online reward source and evaluation all score through `reward_scores`, so a reward
model is never evaluated on a different tokenisation (prompt ids + response ids + EOS, right padded)
from the one it was trained on.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from distalign.data import DEFAULT_CHAT, ChatFormat, response_end_id, tokenize_prompts, tokenize_responses

from .collate import collate_sequences
from .loading import evaluating


def score_sequences(model, batch: dict) -> Tensor:
    """Scalar reward per right-padded row: the 1-label head's output at the last real token. (B,) fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if logits.dim() == 3:  # a causal-LM-shaped head: pick the last real position ourselves
        last = batch["attention_mask"].sum(-1) - 1
        return logits[torch.arange(logits.shape[0], device=logits.device), last, 0].float()
    return logits[:, 0].float()


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: Sequence, responses: Sequence[str], batch_size: int = 16, *,
                  chat: ChatFormat = DEFAULT_CHAT) -> Tensor:
    """R(x, y) for each (prompt, response); prompts may be strings or chat message lists, rendered under
    `chat` as the reward trainer renders its data. Shape (N,)."""
    if len(prompts) != len(responses):
        raise ValueError(f"reward_scores: {len(prompts)} prompts but {len(responses)} responses")
    if tokenizer.pad_token_id is None:
        raise ValueError("reward model tokenizer has no pad token; set one so the last real token can be found")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    prompt_ids = tokenize_prompts(list(prompts), tokenizer, chat=chat)
    response_ids = tokenize_responses(list(responses), tokenizer, response_end_id(tokenizer, chat))
    scores = []
    with evaluating(model):
        for start in range(0, len(prompt_ids), batch_size):
            batch = collate_sequences(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size],
                                      tokenizer.pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            scores.append(score_sequences(model, batch).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
