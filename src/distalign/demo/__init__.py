"""`distalign demo`: the framework's results table on an embedded ground-truth world, on CPU.

    distalign demo                 # every row, the README's table and plot
    distalign demo --quick         # a smaller world, fewer steps (the tests run it)
    distalign demo --sweep         # choose each row's coefficient on the validation seed (methods.py)

The world is the testbed's synthetic language (`distalign.testbed.lm`): a reference pi0 and a target
pi* with exact log-probabilities. Everything else is the real pipeline on a real (tiny) Llama:
SFT on pi0 samples -> a Bradley-Terry reward model on pairs labelled by pi* -> every method from the
same SFT start (online ones twice: with the learned reward model and with the oracle reward
gamma log pi*) -> the same evaluation for each model (exact: win-rate against SFT, KL(pi* || pi), mass
off pi*'s support; on samples: the win-rate again, reward-model score, KL(pi || pi_sft)).
Each row's coefficient was chosen by `--sweep` on another seed with the same budget for every row
(`methods.CHOSEN`, recorded in docs/demo_sweep_*.json); `claims.CLAIMS` are the README's sentences.
"""
from .pipeline import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
