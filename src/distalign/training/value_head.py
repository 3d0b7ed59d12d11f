"""PPO's value head: a linear map from the policy's last hidden states to V(s_t), one scalar per token.

The head sits on the policy's own trunk (one forward gives log-probs and values), which is cheaper than
a separate value model but couples the two losses through shared features; `vf_coef` balances them.
Initialisation: zeros ("policy": V = 0 at the start, so the first advantages are the rewards-to-go),
or the score head of a reward model with the same hidden size ("reward_model"). Copying only the head
is an approximation of initialising from the reward model: the trunk stays the policy's.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .rollout import grouped_response_forward


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(B, T, H) -> (B, T) values in fp32."""
        return self.score(hidden_states.to(self.score.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_reward_model(cls, reward_model: nn.Module) -> ValueHead:
        """Copy the single-label score layer of an AutoModelForSequenceClassification."""
        score = getattr(reward_model, "score", None) or getattr(reward_model, "classifier", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError("value_model: expected a sequence classifier with a one-output linear 'score' head")
        head = cls(score.in_features)
        with torch.no_grad():
            head.score.weight.copy_(score.weight.float())
            if score.bias is not None:
                head.score.bias.copy_(score.bias.float())
        return head


class PolicyWithValueHead(nn.Module):
    """Policy and (optional) value head as one module, so the optimizer, checkpoints and DDP cover both.
    Its forward scores a sampled batch (the update's forward goes through DDP's wrapper, which is what
    makes DDP average the gradients)."""

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, batch, group_size: int, temperature: float, with_entropy: bool = False):
        """`rollout.grouped_response_forward` of the policy (values from the head, if any)."""
        return grouped_response_forward(self.policy, batch, group_size, temperature, self.value_head, with_entropy)


def build_value_head(policy: nn.Module, init: str = "policy", reward_model: nn.Module | None = None) -> ValueHead:
    """A value head sized for `policy`; `init` is "policy" (zeros) or "reward_model" (copy its head)."""
    hidden = policy.config.hidden_size
    if init == "policy":
        head = ValueHead(hidden)
    elif init == "reward_model":
        if reward_model is None:
            raise ValueError("value_model: required when value_init is 'reward_model'")
        head = ValueHead.from_reward_model(reward_model)
        if head.score.in_features != hidden:
            raise ValueError(f"value_model: its hidden size {head.score.in_features} differs from the "
                             f"policy's {hidden}; the head cannot be copied")
    else:
        raise ValueError(f"value_init: expected 'policy' or 'reward_model', got {init!r}")
    return head.to(next(policy.parameters()).device)
