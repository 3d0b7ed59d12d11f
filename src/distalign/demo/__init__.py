"""`distalign demo`: the framework's results table on an embedded ground-truth world, on CPU.

    distalign demo                 # about 3-5 minutes on 2 cores
    distalign demo --quick         # under a minute: a smaller world, fewer steps

The world is the testbed's synthetic language (`distalign.testbed.lm`): a reference pi0 and a target
pi* with exact log-probabilities. Everything else is the real pipeline on a real (tiny) Llama:
SFT on pi0 samples -> a Bradley-Terry reward model on pairs labelled by pi* -> every method from the
same SFT start -> the same evaluation for each model (oracle win-rate against SFT, reward-model
score, KL(pi || pi_sft) on the model's own samples, exact KL(pi* || pi)).
"""
from .pipeline import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
