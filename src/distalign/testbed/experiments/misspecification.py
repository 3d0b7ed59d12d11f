"""`distalign testbed misspecification`: KL(pi* || pi_hat) of each objective as a misspecification grows.

Labels come from a switch of `testbed.misspecification` (gamma' != gamma, label noise, Condorcet
annotators, reward-based Bradley-Terry, context-dependent gamma(x)); the learners assume seed 001
Eq. 3 with gamma. Objectives, all with population minimiser pi* when well specified: PMLE (Eq. 5,
beta = 0), preference distillation from a fitted BT reward (Eq. 9 + 11), and reverse KL (Eq. 16) with
beta = 0, whose optimum is softmax(Rhat / gamma). The table also says, for the Condorcet switch,
whether the majority relation is cyclic (no transitive model can then match the labels).
Distillation and reverse KL with beta = 0 share their minimiser softmax(Rhat / gamma) whenever the
comparison graph is connected, so their columns agree: a consistency check, not two findings.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .. import misspecification as ms
from .. import tabular as tb
from .. import tabular_fit as tf
from ..plotting import line_plot, markdown_table, write_results, write_table

OBJECTIVES = ("pmle", "distill_fitted", "reverse_kl")


def fit_objectives(problem: tb.TabularProblem, wins_list: list) -> list[dict]:
    """PMLE, distillation and reverse KL (beta = 0) on each dataset. Datasets of equal n are stacked
    along the seed axis into one tensor, so each objective is a single Newton run."""
    gamma = problem.gamma
    wins = torch.cat(wins_list)
    reward, pmle = tf.solve([tf.bt_reward_fit(wins), tf.pmle_fit(wins, gamma)])
    uniform_ref = torch.full_like(problem.ref_logps, -float(np.log(problem.shape[1])))
    distill, reverse_kl = tf.solve([tf.distill_fit(wins, reward, gamma),
                                    tf.reverse_kl_fit(reward, uniform_ref, 0.0, gamma)])
    sizes = [w.shape[0] for w in wins_list]
    parts = {name: table.split(sizes) for name, table in
             dict(pmle=pmle, distill_fitted=distill, reverse_kl=reverse_kl).items()}
    return [{name: parts[name][i] for name in OBJECTIVES} for i in range(len(wins_list))]


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    """Every switch x strength x objective; writes results.json, table.md and one PNG per switch."""
    out_dir = Path(out_dir)
    n, n_seeds = (2000, 8) if quick else (4000, 30)
    problem = tb.make_problem(4, 8, sigma=1.5, gamma=1.0, seed=seed)
    mu = tb.uniform_mu(*problem.shape)
    gen = torch.Generator().manual_seed(seed + 1)
    cells, wins_list = [], []
    for switch, strengths in ms.STRENGTHS.items():
        for strength in strengths:
            pref = ms.preference_table(problem, switch, strength)
            cells.append((switch, strength, pref))
            wins_list.append(tb.sample_wins(mu, pref, n, n_seeds, gen))
    start = time.perf_counter()
    fits = fit_objectives(problem, wins_list)
    elapsed = time.perf_counter() - start
    results, rows = {}, []
    for (switch, strength, pref), fit in zip(cells, fits):
        entry = {name: float(tb.kl(problem.target_logps, fit[name]).mean()) for name in OBJECTIVES}
        entry["pref_accuracy_pmle"] = float(tb.preference_accuracy(problem.target_logps, fit["pmle"]).mean())
        entry["cyclic_contexts"] = int(ms.majority_cycle(pref).sum())
        results.setdefault(switch, {})[str(strength)] = entry
        rows.append([switch, strength] + [entry[name] for name in OBJECTIVES]
                    + [entry["pref_accuracy_pmle"], f"{entry['cyclic_contexts']}/{problem.shape[0]}"])
    for switch, by_strength in results.items():
        xs = [float(s) for s in by_strength]
        series = {name: (xs, [v[name] for v in by_strength.values()]) for name in OBJECTIVES}
        line_plot(out_dir / f"{switch}.png", series, f"{switch} strength", "mean KL(pi* || pi_hat)",
                  f"misspecification: {switch} (n={n}, {n_seeds} seeds)", logy=True)
    header = ["switch", "strength", *[f"KL(pi*, {name})" for name in OBJECTIVES], "pref. acc. (PMLE)",
              "contexts with a majority cycle"]
    write_table(out_dir, [(f"KL(pi* || pi_hat) under misspecification, n = {n}, {n_seeds} seeds "
                           f"(fits took {elapsed:.2f} s)", markdown_table(header, rows))])
    summary = dict(results=results, n=n, n_seeds=n_seeds, seed=seed, quick=quick, elapsed_s=elapsed,
                   strength_meaning={"gamma_mismatch": "gamma'/gamma", "label_noise": "flip rate",
                                     "condorcet": "score scale", "reward_bt": "lambda",
                                     "context_gamma": "log-spread of gamma(x)"})
    write_results(out_dir, summary)
    return summary
