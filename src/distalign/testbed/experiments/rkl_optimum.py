"""`distalign testbed rkl-optimum`: the maximiser of the reverse-KL objective (seed 001 Eq. 16),

    max_p  p . r + gamma H(p) - beta KL(p || p0),

is p ~ p0^alpha exp(r / (beta + gamma)), alpha = beta / (beta + gamma) ("prior smoothing", seed 001
§5), and for gamma = 0 it is RLHF's p0 exp(r / beta). The objective is optimised numerically through
the library's `reverse_kl_shaped_reward` (tabular_fit.reverse_kl_fit) over a grid of beta and gamma,
and compared with the closed form written out here in numpy (independent of the library's
`reverse_kl_optimum`, which is checked too).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from distalign.objectives import reverse_kl_optimum

from .. import tabular as tb
from .. import tabular_fit as tf
from ..plotting import line_plot, markdown_table, write_results, write_table

TOLERANCE = 1e-4


def closed_form(ref_probs: np.ndarray, reward: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """p ~ p0^(beta/(beta+gamma)) exp(r/(beta+gamma)), normalised over the last axis."""
    logits = beta / (beta + gamma) * np.log(ref_probs) + reward / (beta + gamma)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    betas = (0.1, 0.5, 2.0) if quick else (0.05, 0.1, 0.5, 1.0, 2.0, 5.0)
    gammas = (0.0, 0.5, 2.0) if quick else (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
    problem = tb.make_problem(n_contexts=4, n_responses=8, sigma=1.0, seed=seed, ref_sigma=1.5)
    reward, ref_logps = problem.reward, problem.ref_logps
    grid = [(beta, gamma) for beta in betas for gamma in gammas]
    fitted = tf.solve([tf.reverse_kl_fit(reward[None], ref_logps, beta, gamma) for beta, gamma in grid])
    rows, cells = [], []
    for (beta, gamma), logps in zip(grid, fitted):
        expected = closed_form(ref_logps.exp().numpy(), reward.numpy(), beta, gamma)
        error = float(np.abs(logps[0].exp().numpy() - expected).max())
        library_error = float(np.abs(reverse_kl_optimum(ref_logps.exp(), reward, beta, gamma).numpy()
                                     - expected).max())
        rlhf_form = closed_form_rlhf(ref_logps.exp().numpy(), reward.numpy(), beta)
        rlhf_error = float(np.abs(logps[0].exp().numpy() - rlhf_form).max()) if gamma == 0 else None
        entropy = float(-(logps.exp() * logps).sum(-1).mean())
        cells.append(dict(beta=beta, gamma=gamma, alpha=beta / (beta + gamma), max_abs_error=error,
                          library_closed_form_error=library_error, rlhf_form_error=rlhf_error,
                          mean_entropy=entropy, passed=error < TOLERANCE))
        rows.append([beta, gamma, beta / (beta + gamma), error, library_error,
                     "-" if rlhf_error is None else rlhf_error, entropy, "yes" if error < TOLERANCE else "NO"])
    series = {f"gamma={g}": ([c["beta"] for c in cells if c["gamma"] == g],
                             [c["mean_entropy"] for c in cells if c["gamma"] == g]) for g in gammas}
    line_plot(out_dir / "entropy.png", series, "beta (KL weight)", "mean entropy of the optimum (nats)",
              "Prior smoothing: larger gamma keeps the optimum spread out")
    errors = {f"gamma={g}": ([c["beta"] for c in cells if c["gamma"] == g],
                             [max(c["max_abs_error"], 1e-17) for c in cells if c["gamma"] == g]) for g in gammas}
    line_plot(out_dir / "error.png", errors, "beta (KL weight)", "max |p_fit - p_closed_form|",
              f"Numerical optimum vs closed form (tolerance {TOLERANCE:g})", loglog=True, hline=TOLERANCE)
    header = ["beta", "gamma", "alpha", "max abs(p_fit - closed form)", "library closed form error",
              "gamma=0: max abs(p_fit - p0 exp(r/beta))", "mean entropy", f"< {TOLERANCE:g}"]
    write_table(out_dir, [("Reverse-KL optimum (Eq. 16) vs p0^alpha exp(r/(beta+gamma))",
                           markdown_table(header, rows))])
    results = dict(cells=cells, all_passed=all(c["passed"] for c in cells), tolerance=TOLERANCE,
                   reward=reward, ref_logps=ref_logps, seed=seed, quick=quick)
    write_results(out_dir, results)
    return results


def closed_form_rlhf(ref_probs: np.ndarray, reward: np.ndarray, beta: float) -> np.ndarray:
    """RLHF's optimum p0 exp(r / beta), normalised (Rafailov et al. 2023, Eq. 4)."""
    logits = np.log(ref_probs) + reward / beta
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)
