"""Collators: token-id lists -> right-padded tensors for `logprobs.sequence_logps` / `pair_logps`.

Two layouts for preference pairs (PERFORMANCE.md, "Share the prompt"):

    shared (one row per pair):   [ prompt | chosen | rejected | pad ]
        positions                  0..P-1   P..P+C-1  P..P+R-1   0
        segment_ids                  0        1         2        -1
    rows (two rows per pair):    [ prompt | chosen | pad ]  for pairs 0..B-1, then
                                 [ prompt | rejected | pad ] for pairs 0..B-1

In the shared layout `logprobs.shared_prompt_mask` lets a token attend to earlier tokens of the
prompt and of its own segment only, and rejected positions restart at the prompt's end, so every
log-prob equals the two-row forward's while the prompt is encoded once. Records are duck-typed:
anything with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of ints) is a pair.

Batches carry tensors plus two Python ints: `logits_from` (the first position whose logits are
needed, i.e. shortest prompt - 1, so the LM head can skip the prompts) and `pad_token_id`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


def _check_nonempty(ids: Sequence[int], row: int, field: str) -> None:
    if len(ids) == 0:
        raise ValueError(f"collate: row {row}: field '{field}': empty; a response is scored given a "
                         f"non-empty prompt (at least a BOS token) and must itself be non-empty")


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_token_id: int) -> dict:
    """Right-padded [prompt | response] rows.

    Returns input_ids (B, T) long, attention_mask (B, T) long, response_mask (B, T) bool (True on
    response tokens), prompt_lengths (B,) long, and the ints logits_from, pad_token_id.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("collate: empty batch")
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        _check_nonempty(prompt, row, "prompt")
        _check_nonempty(response, row, "response")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :end] = 1
        response_mask[row, len(prompt):end] = True
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "prompt_lengths": prompt_lengths, "logits_from": min(len(p) for p in prompts) - 1,
            "pad_token_id": int(pad_token_id)}


def collate_pairs(pairs, pad_token_id: int, share_prompt: bool = True) -> dict:
    """Batch preference pairs in the shared layout (one row each) or the rows layout (2B rows).

    Shared: input_ids, attention_mask, position_ids, segment_ids (B, T), prompt_lengths,
    chosen_lengths, rejected_lengths (B,), logits_from, pad_token_id.
    Rows: `collate_sequences` of B [prompt|chosen] rows followed by B [prompt|rejected] rows.
    """
    pairs = list(pairs)
    if not share_prompt:
        prompts = [p.prompt_ids for p in pairs]
        return collate_sequences(prompts * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                                 pad_token_id)
    if not pairs:
        raise ValueError("collate: empty batch")
    for row, pair in enumerate(pairs):
        for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
            _check_nonempty(getattr(pair, field), row, field)
    lengths = torch.tensor([[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs])
    width = int(lengths.sum(-1).max())
    input_ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(pairs), width), dtype=torch.long)
    segment_ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
    for row, pair in enumerate(pairs):
        n_prompt, n_chosen, n_rejected = (int(n) for n in lengths[row])
        end = n_prompt + n_chosen + n_rejected
        input_ids[row, :end] = torch.tensor(list(pair.prompt_ids) + list(pair.chosen_ids)
                                            + list(pair.rejected_ids), dtype=torch.long)
        position_ids[row, :end] = torch.cat([torch.arange(n_prompt + n_chosen),
                                             torch.arange(n_prompt, n_prompt + n_rejected)])
        segment_ids[row, :end] = torch.tensor([PROMPT] * n_prompt + [CHOSEN] * n_chosen + [REJECTED] * n_rejected)
    return {"input_ids": input_ids, "attention_mask": (segment_ids != PAD).long(), "position_ids": position_ids,
            "segment_ids": segment_ids, "prompt_lengths": lengths[:, 0].clone(),
            "chosen_lengths": lengths[:, 1].clone(), "rejected_lengths": lengths[:, 2].clone(),
            "logits_from": int(lengths[:, 0].min()) - 1, "pad_token_id": int(pad_token_id)}


def unshare_pairs(batch: dict) -> dict:
    """Rebuild the rows layout from a shared-layout batch (for models that cannot take a 4D mask)."""
    prompts, chosen, rejected = [], [], []
    ids = batch["input_ids"].tolist()
    lengths = zip(batch["prompt_lengths"].tolist(), batch["chosen_lengths"].tolist(),
                  batch["rejected_lengths"].tolist())
    for row, (n_prompt, n_chosen, n_rejected) in zip(ids, lengths):
        prompts.append(row[:n_prompt])
        chosen.append(row[n_prompt:n_prompt + n_chosen])
        rejected.append(row[n_prompt + n_chosen:n_prompt + n_chosen + n_rejected])
    rows = collate_sequences(prompts * 2, chosen + rejected, batch["pad_token_id"])
    device = batch["input_ids"].device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in rows.items()}
