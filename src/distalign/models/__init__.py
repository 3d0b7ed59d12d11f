"""Models: tiny-model factory, HF/PEFT loading and the reference, collators and log-prob gathering.

The log-prob functions follow docs/ARCHITECTURE.md: `token_logps[:, t]` is the log-prob of
`input_ids[:, t]` given its prefix, zero outside the response, fp32; `logps` is their sum.
"""
from .collate import collate_pairs, collate_sequences, unshare_pairs
from .loading import (
                      ModelLoadError,
                      ReferenceModel,
                      enable_gradient_checkpointing,
                      evaluating,
                      is_peft_model,
                      load_policy,
                      load_reward_model,
                      load_tokenizer,
                      merged_state_dict,
                      reference_context,
                      save_model,
                      unwrap_model,
)
from .logprobs import (
                      PairForward,
                      pair_logps,
                      sequence_logps,
                      shared_prompt_attention,
                      shared_prompt_mask,
                      supports_shared_prompt,
                      token_logps_from_logits,
)
from .scoring import reward_scores, score_sequences
from .sources import ModelSource, locate
from .tiny import make_tiny, make_tiny_reward_model, train_tokenizer

__all__ = [
    "ModelLoadError", "ModelSource", "PairForward", "locate", "ReferenceModel", "collate_pairs", "collate_sequences",
    "enable_gradient_checkpointing", "evaluating",
    "is_peft_model",
    "load_policy", "load_reward_model", "load_tokenizer", "make_tiny", "make_tiny_reward_model",
    "merged_state_dict", "pair_logps",
    "reference_context", "reward_scores", "save_model", "score_sequences", "sequence_logps", "shared_prompt_attention", "shared_prompt_mask",
    "supports_shared_prompt",
    "token_logps_from_logits", "train_tokenizer", "unshare_pairs", "unwrap_model",
]
