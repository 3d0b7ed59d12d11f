"""`distalign testbed undesirable-space`: DPO settles inside CPO's undesirable space U (seed 003).

Tabular part. Each context x has two responses, y+ (preferred by the target) and y-, and a reference
that strongly prefers y-: delta_ref = log pi0(y+) - log pi0(y-) << 0. Labels say y+ > y- with
probability p (Eq. 3 with a finite log-ratio), so each objective's expected loss is
p loss(y+, y-) + (1 - p) loss(y-, y+). Its stationary points (beta = gamma = 1, lengths 1):

- DPO: beta (delta_pi - delta_ref) = logit(p), i.e. delta_pi = delta_ref + logit(p) / beta < 0 whenever
  delta_ref < -logit(p) / beta: the policy gains on the reference, its loss falls below log 2, and it
  still prefers y- -- a point of U = {delta_pi < 0, delta_pi > delta_ref}. (With p = 1 the DPO
  minimiser is at infinity and DPO eventually leaves U; with p < 1 it stays.)
- CPO (full, simple, clip) and PMLE: a stationary delta_pi > 0 (about logit(p)/beta, plus the margin for
  full / simple CPO; the reversed pair's term pulls clip CPO slightly lower), outside U.
Policies start at the reference and take plain gradient-descent steps on the library's losses, so
the plots show trajectories: delta_pi, frac_in_undesirable and the DPO loss over steps.

Language part: `experiments.undesirable_space_lm.run_lm(out_dir, quick, seed)` (another module) is
called when it exists; its results are stored under "lm".
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch

from distalign.objectives import cpo_loss, dpo_loss, frac_in_undesirable, pmle_loss

from ..plotting import line_plot, markdown_table, write_results, write_table
from ..tabular_fit import single_thread

BETA, P_CHOSEN, MARGIN, LR = 1.0, 0.75, 0.5, 0.5
OBJECTIVES = ("dpo", "cpo_full", "cpo_simple", "cpo_clip", "pmle")


def pair_loss(name: str, policy_a, policy_b, ref_a, ref_b) -> torch.Tensor:
    """Per-pair loss of `name` with a chosen, b rejected; single-token responses (lengths 1)."""
    if name == "dpo":
        return dpo_loss(policy_a, policy_b, ref_a, ref_b, BETA)
    if name == "pmle":
        return pmle_loss(policy_a, policy_b, BETA)
    ones = torch.ones_like(policy_a)
    return cpo_loss(policy_a, policy_b, ref_a, ref_b, ones, ones, beta=BETA, margin=MARGIN,
                    variant=name.removeprefix("cpo_"))


def expected_loss(name: str, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """p loss(y+, y-) + (1 - p) loss(y-, y+), averaged over contexts; logps (X, 2), column 0 = y+."""
    forward = pair_loss(name, logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1])
    backward = pair_loss(name, logps[:, 1], logps[:, 0], ref_logps[:, 1], ref_logps[:, 0])
    return (P_CHOSEN * forward + (1.0 - P_CHOSEN) * backward).mean()


def trajectory(name: str, ref_logps: torch.Tensor, steps: int) -> dict[str, list]:
    """Gradient descent on tabular logits from the reference; delta_pi, frac in U and DPO loss per step."""
    logits = ref_logps.clone().requires_grad_(True)
    delta_ref = ref_logps[:, 0] - ref_logps[:, 1]
    history = {"delta_pi_mean": [], "frac_in_undesirable": [], "dpo_loss": [], "delta_pi_final": None}
    for _ in range(steps + 1):
        logps = torch.log_softmax(logits, -1)
        delta_pi = (logps[:, 0] - logps[:, 1]).detach()
        history["delta_pi_mean"].append(float(delta_pi.mean()))
        history["frac_in_undesirable"].append(float(frac_in_undesirable(delta_pi, delta_ref)))
        history["dpo_loss"].append(float(expected_loss("dpo", logps.detach(), ref_logps)))
        loss = expected_loss(name, logps, ref_logps)
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= LR * grad * logits.shape[0]  # per-context step size LR (the loss is a mean)
    history["delta_pi_final"] = delta_pi.tolist()
    return history


def run_language_level(out_dir: Path, quick: bool, seed: int) -> dict:
    try:
        module = importlib.import_module("distalign.testbed.experiments.undesirable_space_lm")
    except ModuleNotFoundError as err:
        if err.name != "distalign.testbed.experiments.undesirable_space_lm":
            raise
        return {"skipped": "distalign.testbed.experiments.undesirable_space_lm is not available"}
    return module.run_lm(out_dir / "lm", quick=quick, seed=seed)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    steps = 80 if quick else 400
    delta_refs = torch.tensor([-6.0, -4.0, -3.0, -2.0, -1.5, -0.5], dtype=torch.float64)
    ref_logps = torch.log_softmax(torch.stack([delta_refs, torch.zeros_like(delta_refs)], -1), -1)
    with single_thread():
        runs = {name: trajectory(name, ref_logps, steps) for name in OBJECTIVES}
    logit_p = math.log(P_CHOSEN / (1.0 - P_CHOSEN))
    dpo_stationary = (delta_refs + logit_p / BETA).tolist()
    rows = [[name, *[f"{d:.2f}" for d in h["delta_pi_final"]], h["frac_in_undesirable"][-1], h["dpo_loss"][-1]]
            for name, h in runs.items()]
    rows.append(["DPO stationary point delta_ref + logit(p)/beta", *[f"{d:.2f}" for d in dpo_stationary],
                 float(sum(d < 0 for d in dpo_stationary)) / len(dpo_stationary), "-"])
    header = ["objective", *[f"delta_pi (delta_ref={d:g})" for d in delta_refs.tolist()],
              "frac in U (final)", "DPO loss (final)"]
    write_table(out_dir, [(f"After {steps} gradient steps (beta={BETA}, p={P_CHOSEN}, CPO margin={MARGIN}); "
                           f"log 2 = {math.log(2):.4f}", markdown_table(header, rows))])
    xs = list(range(steps + 1))
    line_plot(out_dir / "delta_pi.png", {n: (xs, h["delta_pi_mean"]) for n, h in runs.items()},
              "gradient step", "mean delta_pi = log pi(y+) - log pi(y-)", "Policy preference over steps", hline=0.0)
    line_plot(out_dir / "frac_in_undesirable.png", {n: (xs, h["frac_in_undesirable"]) for n, h in runs.items()},
              "gradient step", "fraction of pairs in U", "Pairs in the undesirable space U")
    line_plot(out_dir / "dpo_loss.png", {n: (xs, h["dpo_loss"]) for n, h in runs.items()},
              "gradient step", "expected DPO loss of the iterate", "DPO loss along each trajectory",
              hline=math.log(2))
    results = dict(tabular=dict(delta_refs=delta_refs, beta=BETA, p_chosen=P_CHOSEN, margin=MARGIN, lr=LR,
                                steps=steps, dpo_stationary_delta_pi=dpo_stationary, runs=runs),
                   seed=seed, quick=quick)
    results["lm"] = run_language_level(out_dir, quick, seed)
    write_results(out_dir, results)
    return results
