"""Reference log-probs computed once per (reference, tokenized data) and cached on disk.

A DPO step spends about a quarter of its FLOPs on the reference forward (PERFORMANCE.md); caching
removes it from every epoch and every hyperparameter sweep over the same data. The cache key hashes
the reference's identity and every token id, so changing either recomputes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .common import record_length

PRECOMPUTE_TOKENS = 2048  # tokens per no-grad reference batch (larger ones run slower on CPU: cache)


def cache_dir() -> Path:
    return Path(os.environ.get("DISTALIGN_CACHE", Path.home() / ".cache" / "distalign")) / "reference_logps"


def cache_key(reference_name: str, records, share_prompt: bool, precision: str = "float32|no") -> str:
    """`precision`: the reference's weight dtype and autocast, which change its log-probs."""
    digest = hashlib.sha256(f"{reference_name}|{share_prompt}|{precision}".encode())
    for r in records:
        for ids in (r.prompt_ids, r.chosen_ids, r.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(b"".join(int(i).to_bytes(4, "little") for i in ids))
    return digest.hexdigest()[:32]


@torch.no_grad()
def precompute_reference_logps(trainer, records) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference log-probs of every record, shape (N,), from cache or computed now."""
    cfg = trainer.cfg
    name = str(cfg.reference or cfg.model.name_or_path)
    precision = f"{cfg.model.dtype}|{cfg.train.mixed_precision}"
    path = cache_dir() / f"{cache_key(name, records, cfg.share_prompt, precision)}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        trainer.log(f"reference log-probs: loaded from {path}")
        return cached["chosen"], cached["rejected"]
    chosen, rejected = torch.empty(len(records)), torch.empty(len(records))
    # Order doesn't matter here, so batch pairs of similar length (almost no padding), at least twice
    # training's batch (no activations are kept).
    lengths = torch.tensor([record_length(r) for r in records])
    order = lengths.argsort(descending=True)
    size = max(cfg.train.batch_size * 2, PRECOMPUTE_TOKENS // max(1, int(lengths.max())))
    for indices in order.split(size):
        batch = trainer.batch(indices, records)
        with trainer.acc.autocast():
            c, r = trainer.task.reference_logps(batch, trainer.reference)
        chosen[indices], rejected[indices] = c.float().cpu(), r.float().cpu()
    if trainer.acc.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp))
        tmp.replace(path)
    trainer.log(f"reference log-probs: computed for {len(records)} pairs, cached at {path}")
    return chosen, rejected
