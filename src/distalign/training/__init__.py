"""Training loops: offline (SFT, reward models, pairwise objectives) and online (rollout -> score -> update).

Entry points are imported lazily by callers (`distalign.training.offline.train_offline`,
`distalign.training.online.train_online`) so importing one loop does not load the other.
"""
