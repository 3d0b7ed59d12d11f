"""Reward sources behind one interface `source(prompts, completions, rows) -> Tensor (B,)`:
reward models, Python callables ('module:function'), built-in verifiers, and weighted sums."""
from .sources import (
                      BUILTIN,
                      CallableJudge,
                      CallableSource,
                      RewardModelSource,
                      RewardSource,
                      WeightedSum,
                      build_reward,
                      import_callable,
)
from .verifiers import exact_answer, last_number, regex_reward

__all__ = [
                      "BUILTIN",
                      "CallableJudge",
                      "CallableSource",
                      "RewardModelSource",
                      "RewardSource",
                      "WeightedSum",
                      "build_reward",
                      "exact_answer",
                      "import_callable",
                      "last_number",
                      "regex_reward",
]
