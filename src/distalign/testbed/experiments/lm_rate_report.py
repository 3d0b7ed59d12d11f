"""table.md, results.json and plots of `lm-rate` (the numbers come from `lm_rate.run`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plotting import line_plot, markdown_table, write_results, write_table

LIMIT = {"pmle": "pi*", "distill": "pi*", "dpo": "pi_inf ∝ ref * pi*"}


def rate_rows(summary: dict) -> list[list]:
    rows = []
    for method, s in summary.items():
        for n, v in s["per_n"].items():
            rows.append([method, n, v["runs"], f"{v['mean_kl']:.3e} ± {v['sem']:.1e}", v["n_times_kl"],
                         v["mean_kl_target"], f"{v['converged']}/{v['runs']}"])
    return rows


def slope_rows(summary: dict) -> list[list]:
    return [[method, s["slope"], f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]", f"{min(s['slope_ns'])}-{max(s['slope_ns'])}",
             s["n_kl_spread"], "yes" if s["all_converged"] else "NO"] for method, s in summary.items()]


def run_rows(runs: dict) -> list[list]:
    """One line per fit: the convergence evidence the stopping rule used."""
    rows = []
    for method, by_n in runs.items():
        for n, reports in by_n.items():
            for r in reports:
                excess = r["loss_ref"] - r["loss_min"]
                rows.append([method, n, r["seed"], r["loss"], r["loss_min"], r["loss_target"], r["loss_ref"],
                             r["gap"] / excess if excess > 0 else float("nan"), r["kl_to_minimiser"],
                             r["evaluations"], r["adam_phases"], r["seconds"], r["mass_outside_unconstrained"],
                             "yes" if r["converged"] else f"NO ({r['stop_reason']}, finite min: {r['finite_minimum']})"])
    return rows


def write_outputs(out_dir: Path, results: dict) -> None:
    summary, runs = results["summary"], results["runs"]
    reference = markdown_table(["quantity", "value"], [
        ["KL(pi*||pi0)", results["kl_target_to_pi0"]],
        ["KL(pi*||start) (SFT start, support-constrained)", results["kl_target_to_start"]],
        ["start's mass outside the world without the constraint", results["start_mass_outside_unconstrained"]],
        ["DPO floor KL(pi*||pi_inf)", results["kl_target_to_dpo_limit"]]]
        + [[f"population fit vs closed-form limit (max abs prob): {k}", v]
           for k, v in results["population_error"].items()])
    write_table(out_dir, [
        ((f"Exact E KL(pi_inf||pi_hat_n), network fitted to its empirical minimum ({results['seconds']:.0f} s, "
          f"seed {results['seed']})"), markdown_table(
             ["method", "n", "seeds", "KL(pi_inf||pi_hat) mean ± s.e.", "n * KL", "KL(pi*||pi_hat)", "converged"],
             rate_rows(summary))),
        ("Log-log slope over the asymptotic range (95% bootstrap CI over seeds); pi_inf: "
         + ", ".join(f"{m} {v}" for m, v in LIMIT.items()),
         markdown_table(["method", "slope", "95% CI", "n range", "n*KL max/min", "all converged in range"],
                        slope_rows(summary))),
        ("What the data shows", "\n".join(f"- {line}" for line in results["verdict"])),
        ("Reference points and checks", reference),
        (("Every fit: empirical losses on its own pairs (L(pi_hat), tabular minimum L_min, the target's "
          "L(pi*), the method's limit L(pi_inf)), gap / (L(pi_inf) - L_min), KL(minimiser||pi_hat), cost"),
         markdown_table(["method", "n", "seed", "L(pi_hat)", "L_min", "L(pi*)", "L(pi_inf)", "rel. gap",
                         "KL(min||pi_hat)", "evals", "Adam phases", "s", "mass outside (bare net)", "converged"],
                        run_rows(runs)))])
    write_results(out_dir, results)
    plots(out_dir, results)


def plots(out_dir: Path, results: dict) -> None:
    summary = results["summary"]
    ns = list(results["ns"])
    series, errors = {}, {}
    for method in ("pmle", "distill"):
        series[f"{method}: KL(pi*||pi_hat)"] = (ns, [summary[method]["per_n"][n]["mean_kl"] for n in ns])
        errors[f"{method}: KL(pi*||pi_hat)"] = [summary[method]["per_n"][n]["sem"] for n in ns]
    dpo = summary["dpo"]["per_n"]
    series["dpo: KL(pi_inf||pi_hat), own limit"] = (ns, [dpo[n]["mean_kl"] for n in ns])
    errors["dpo: KL(pi_inf||pi_hat), own limit"] = [dpo[n]["sem"] for n in ns]
    series["dpo: KL(pi*||pi_hat)"] = (ns, [dpo[n]["mean_kl_target"] for n in ns])
    series["dpo floor KL(pi*||pi_inf)"] = (ns, [results["kl_target_to_dpo_limit"]] * len(ns))
    anchor = series["pmle: KL(pi*||pi_hat)"][1][-1] * ns[-1]
    series["slope -1"] = (ns, [anchor / n for n in ns])
    line_plot(out_dir / "lm_rate.png", series, "number of preference pairs n", "exact KL (nats)",
              "Language-level rate: tiny Llama at its empirical minimum", loglog=True,
              reference=("dpo floor KL(pi*||pi_inf)", "slope -1"), errors=errors)
    nkl = {f"{m}: n * KL(pi_inf||pi_hat)": (ns, [summary[m]["per_n"][n]["n_times_kl"] for n in ns]) for m in summary}
    low = min(summary["pmle"]["slope_ns"])
    line_plot(out_dir / "lm_rate_nkl.png", nkl, "number of preference pairs n", "n * KL(pi_inf||pi_hat)",
              "n * KL: flat under O(1/n)", loglog=True, note=f"slopes fitted over n >= {low}")
    evals = {m: (ns, [float(np.median([r["evaluations"] for r in results["runs"][m][n]])) for n in ns])
             for m in summary}
    line_plot(out_dir / "lm_rate_evaluations.png", evals, "number of preference pairs n",
              "median L-BFGS evaluations to the tolerance", "Optimisation cost per fit", loglog=True)
