"""`distalign testbed dpo-degeneracy`: the tutorial's Table I (seed 002 §IV-C).

pi_ref = (.5, .5, 0) over (y1, y2, y3) and one preference y1 > y2. The DPO loss (Eq. 18),
-log sigma(beta (log pi(y1)/pi_ref(y1) - log pi(y2)/pi_ref(y2))), depends on pi only through the
ratio pi(y1)/pi(y2). Along pi_{alpha,delta} = (alpha (1 - delta), alpha delta, 1 - alpha) the ratio is
(1 - delta)/delta for every alpha, so each alpha in (0, 1] gives the same loss, which tends to the
infimum 0 as delta -> 0: DPO's minimisers (in the limit) include policies with mass 1 - alpha on y3,
a response the reference never produces. RLHF's optimum pi_ref exp(r/beta) / Z has pi(y3) = 0 for
any reward, even one that prefers y3, because the KL term forbids leaving the reference's support.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distalign.objectives import dpo_loss, reverse_kl_optimum

from ..plotting import line_plot, markdown_table, write_results, write_table

REF = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
BETA = 0.1


def dpo_family_loss(alpha: float, delta: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """DPO loss of pi = (alpha (1 - delta), alpha delta, 1 - alpha) on the pair y1 > y2; delta: (B,)."""
    chosen = torch.log(alpha * (1.0 - delta))
    rejected = torch.log(alpha * delta)
    ref = torch.log(REF[:2])
    return dpo_loss(chosen, rejected, ref[0].expand_as(delta), ref[1].expand_as(delta), beta)


def rlhf_optimum(reward: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """RLHF's maximiser of E[r] - beta KL(pi || pi_ref): pi_ref exp(r / beta) / Z (gamma = 0 in Eq. 16)."""
    return reverse_kl_optimum(REF, reward, beta, 0.0)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    alphas = (1.0, 0.75, 0.5, 0.25, 0.05)
    deltas = torch.logspace(-1, -12 if not quick else -8, 12 if not quick else 6, dtype=torch.float64)
    family = {str(a): dpo_family_loss(a, deltas).tolist() for a in alphas}
    spread = max(float(np.ptp([family[str(a)][i] for a in alphas])) for i in range(len(deltas)))
    rows = [[a, 1.0 - a] + [family[str(a)][i] for i in (0, len(deltas) // 2, len(deltas) - 1)] for a in alphas]
    rewards = {"r = (1, 0, 0)": [1.0, 0.0, 0.0], "r = (1, 0, 10), y3 favoured": [1.0, 0.0, 10.0],
               "r = (1, 0, 100)": [1.0, 0.0, 100.0]}
    rlhf = {name: rlhf_optimum(torch.tensor(r, dtype=torch.float64)) for name, r in rewards.items()}
    rlhf_rows = [[name, *[float(p) for p in probs]] for name, probs in rlhf.items()]
    sections = [
        (f"DPO loss of pi = (alpha(1-delta), alpha delta, 1-alpha), beta = {BETA}: the same for every alpha",
         markdown_table(["alpha", "mass on y3", f"loss at delta={deltas[0]:.0e}",
                         f"delta={deltas[len(deltas) // 2]:.0e}", f"delta={deltas[-1]:.0e}"], rows)),
        ("RLHF optimum pi_ref exp(r/beta)/Z (library reverse_kl_optimum, gamma = 0)",
         markdown_table(["reward", "pi(y1)", "pi(y2)", "pi(y3)"], rlhf_rows)),
        ("Table I (seed 002)", markdown_table(["policy", "y1", "y2", "y3"], [
            ["pi_ref", 0.5, 0.5, 0.0], ["pi_DPO (limit delta -> 0)", "alpha", 0.0, "1 - alpha"],
            ["pi_RLHF (beta -> 0, r = (1, 0, 0))", 1.0, 0.0, 0.0]])),
    ]
    write_table(out_dir, sections)
    xs = deltas.tolist()
    line_plot(out_dir / "dpo_family.png", {f"alpha={a} (y3 mass {1 - a:.2f})": (xs, family[str(a)]) for a in alphas},
              "delta = pi(y2) / (pi(y1) + pi(y2))", "DPO loss", "DPO loss is blind to the mass on y3",
              loglog=True)
    line_plot(out_dir / "y3_mass.png", {
        "DPO minimisers (any alpha)": (list(alphas), [1.0 - a for a in alphas]),
        "RLHF optimum": (list(alphas), [float(rlhf["r = (1, 0, 10), y3 favoured"][2])] * len(alphas))},
        "alpha (family parameter)", "pi(y3)", "Mass on y3, which pi_ref never produces")
    results = dict(beta=BETA, ref=REF, alphas=alphas, deltas=deltas, dpo_family_loss=family,
                   max_loss_spread_across_alpha=spread, dpo_infimum_approached=min(min(v) for v in family.values()),
                   rlhf_optima={k: v.tolist() for k, v in rlhf.items()},
                   rlhf_max_y3_mass=max(float(v[2]) for v in rlhf.values()), seed=seed, quick=quick)
    write_results(out_dir, results)
    return results
