"""Nash learning from human feedback on the tabular testbed (tutorial seed 002 Protocol 7; Munos et al. 2024).

    python -c "from distalign.config import load_config; from distalign.config.online_pairwise import NashConfig; \\
               from distalign.training.nash import train_nash; train_nash(load_config(NashConfig, 'configs/nash_md.yaml'))"

Annotators whose average preference is non-transitive (`testbed.misspecification`, switch "condorcet")
have no Bradley-Terry reward that explains them: a BT reward fitted to their labels, followed by RLHF,
concentrates on one response, which another response beats more often than not. The preference game's
mixed Nash equilibrium pi_NE (max_pi min_pi' P(pi > pi')) is the distribution no response beats:
max_y P(y > pi_NE) = 1/2. Nash mirror descent (`objectives.nash_md_step`, exact on the table) approaches
the tau-regularised equilibrium; we report each policy's exploitability max_y P(y > pi) - 1/2 and its
total-variation distance to pi_NE (computed by a linear program).

Simplification: the pairwise preference model is the exact label probability table of the annotators
(no learned preference model), and the policy is a table, not a language model. For a Hugging Face causal
LM use the sampled form, Nash-MD-PG: `distalign train nash_md_pg` (`training.online_pairwise`,
`objectives.nash_md_pg_loss`, the token-level mixture opponent `training.sampling.MixtureSampler`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distalign.config.online_pairwise import NashConfig
from distalign.objectives.online_pairwise import nash_md_step
from distalign.testbed.misspecification import majority_cycle, preference_table
from distalign.testbed.tabular import DTYPE, expected_wins, make_problem, uniform_mu
from distalign.testbed.tabular_fit import bt_reward_fit, single_thread, solve

from .common import NonFiniteLossError


def exploitability(policy_logps: Tensor, pref: Tensor) -> Tensor:
    """max_y P(y > pi) - 1/2 per context, P(y > pi) = sum_y' pi(y') P(y > y'). (X, K), (X, K, K) -> (X,).
    Zero exactly at a Nash equilibrium of the symmetric preference game."""
    return torch.einsum("xij,xj->xi", pref, policy_logps.exp()).amax(-1) - 0.5


def nash_equilibrium(pref: Tensor) -> Tensor:
    """The mixed equilibrium per context by linear programming: max v s.t. sum_y pi(y) P(y > y') >= v for
    every y', pi in the simplex. Returns probabilities (X, K)."""
    from scipy.optimize import linprog
    rows = []
    for table in pref.numpy():
        k = table.shape[0]
        cost = np.zeros(k + 1)
        cost[-1] = -1.0                                              # maximise v
        upper = np.hstack([-table.T, np.ones((k, 1))])               # v - sum_y pi(y) P(y > y') <= 0
        equal = np.hstack([np.ones((1, k)), np.zeros((1, 1))])
        out = linprog(cost, A_ub=upper, b_ub=np.zeros(k), A_eq=equal, b_eq=[1.0],
                      bounds=[(0, None)] * k + [(None, None)], method="highs")
        rows.append(out.x[:k])
    return torch.tensor(np.array(rows), dtype=DTYPE).clamp_min(0.0)


def run_nash_md(pref: Tensor, ref_logps: Tensor, eta: float, tau: float, steps: int) -> Tensor:
    """`steps` exact Nash-MD updates from the reference; returns log pi (X, K)."""
    logps = ref_logps.clone()
    with single_thread():  # thousands of tiny ops: thread hand-offs would cost more than the math
        for _ in range(steps):
            logps = nash_md_step(logps, ref_logps, pref, eta, tau)
    return logps


def bradley_terry_rlhf(pref: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """The two-stage baseline: the population BT reward fit on uniformly drawn pairs, then the RLHF optimum
    pi ∝ pi0 exp(r / beta) (seed 002 Eq. 16). Returns log pi (X, K)."""
    wins = expected_wins(uniform_mu(*ref_logps.shape), pref)[None] * 1e4      # as if 10^4 labelled pairs
    reward = solve([bt_reward_fit(wins)])[0][0]
    return torch.log_softmax(ref_logps + reward / beta, -1)


def train_nash(cfg: NashConfig) -> dict:
    """Nash-MD vs Bradley-Terry + RLHF on the configured tabular problem; writes results.json / table.md."""
    problem = make_problem(cfg.n_contexts, cfg.n_responses, seed=cfg.train.seed)
    pref = preference_table(problem, cfg.switch, cfg.strength)
    equilibrium = nash_equilibrium(pref)
    policies = {"nash_md": run_nash_md(pref, problem.ref_logps, cfg.eta, cfg.tau, cfg.train.max_steps),
                "bt_rlhf": bradley_terry_rlhf(pref, problem.ref_logps, cfg.bt_beta),
                "reference": problem.ref_logps}
    broken = [name for name, logps in policies.items() if torch.isnan(logps).any() or torch.isposinf(logps).any()]
    if broken:  # log-probs may be -inf (zero mass), never NaN or +inf
        raise NonFiniteLossError(f"nash_md: the {broken[0]} policy is not finite after {cfg.train.max_steps} steps; results "
                                 "not written (lower eta)")
    results = {"cycle": majority_cycle(pref).tolist(), "equilibrium": equilibrium.tolist(), "methods": {}}
    for name, logps in policies.items():
        results["methods"][name] = {
            "exploitability": float(exploitability(logps, pref).mean()),
            "tv_to_equilibrium": float(0.5 * (logps.exp() - equilibrium).abs().sum(-1).mean()),
            "policy": logps.exp().tolist()}
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| method | exploitability | TV to Nash equilibrium |", "| --- | --- | --- |"]
    lines += [f"| {n} | {m['exploitability']:.4f} | {m['tv_to_equilibrium']:.4f} |" for n, m in results["methods"].items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return results
