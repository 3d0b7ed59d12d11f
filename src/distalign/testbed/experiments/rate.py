"""`distalign testbed rate`: E KL(pi_inf || pi_hat_n) against n on the tabular testbed.

Seed 001 Theorems 4, 6 and 7 bound the error of PMLE (Eq. 5, beta = 0), preference distillation
(Eq. 11) and reverse KL (Eq. 16) by O(1/n): on a log-log plot the error has slope -1 and n * KL is
flat for large n. pi_inf is each objective's population minimiser (n = infinity, x uniform, a, b
uniform), which is where the estimator's error is measured from:

- pmle: pi*. Only log-ratios log pi(a|x) - log pi(b|x) enter the loss, so log pi is identified up
  to a per-context constant, which the softmax fixes; uniform mu compares every pair.
- distill_fitted: soft labels sigma(Rhat(a) - Rhat(b)) from a Bradley-Terry reward fitted on the same
  n pairs (Eq. 9). Population: Rhat = gamma log pi* + c(x), and the distillation minimiser is
  softmax(Rhat / gamma) = pi*.
- distill_true: soft labels from the true reward gamma log pi*. They are noise-free, so every
  connected comparison graph identifies pi* exactly (no prior is used): the error is zero up to
  the optimiser's tolerance -- a check, not a rate, so no slope is fitted for it.
- reverse_kl_beta0: Theorem 7's own setting, Eq. 16 with beta = 0 (entropy gamma only) and the
  fitted Rhat: p = softmax(Rhat / gamma), pi_inf = pi*, and the error is the theorem's
  E KL(pi_hat || pi*) (reverse direction; every other row measures KL(pi_inf || pi_hat)). With uniform
  mu every pair is compared, so distill_fitted's minimiser is the same softmax(Rhat / gamma): the two
  rows differ only in the KL direction they are scored in.
- reverse_kl: Eq. 16 with beta = rkl_beta, entropy gamma, reference pi0 (random), measured against
  its own (biased) optimum p ~ pi0^alpha exp(gamma log pi*/(beta+gamma)), not against pi*.
- rlhf (contrast): E[Rhat] - beta KL(pi||pi0), optimum pi0 exp(Rhat/beta); pi_inf = pi0 exp(gamma log pi*/beta).
- dpo: DPO with the random reference pi0 and beta = gamma. Its limit is pi_inf ∝ pi0 pi*, not pi*:
  the table gives its rate to pi_inf and its KL to pi*, which flattens at KL(pi* || pi_inf) (DPO's bias).
- dpo_uniform_ref (wiring check): with a uniform reference and beta = gamma the reference terms
  cancel and DPO is PMLE written differently, so its estimates must equal PMLE's exactly.
The fitted rewards and PMLE / DPO use a unit Gaussian prior of total strength 1 (see tabular_fit).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distalign.objectives import reverse_kl_optimum

from .. import tabular as tb
from .. import tabular_fit as tf
from ..plotting import bootstrap_slope, line_plot, markdown_table, write_results, write_table

OBJECTIVES = ("pmle", "distill_fitted", "distill_true", "reverse_kl_beta0", "reverse_kl", "rlhf", "dpo",
              "dpo_uniform_ref")
RATE_CLAIMED = ("pmle", "distill_fitted", "reverse_kl_beta0")
SAME_ESTIMATE = ("distill_fitted and reverse_kl_beta0 are the same estimate softmax(Rhat / gamma) (uniform mu "
                 "compares every pair), scored in opposite KL directions")
REVERSE_METRIC = ("reverse_kl_beta0",)   # scored by KL(pi_hat || pi_inf), as Theorem 7 states it
CLAIM = {"pmle": "Thm 4", "distill_fitted": "Thm 6", "reverse_kl_beta0": "Thm 7 (beta = 0, KL(pi_hat||pi*))",
         "reverse_kl": "to its own optimum (beta = rkl_beta)", "rlhf": "contrast: to its own optimum",
         "dpo": "to its own limit ∝ pi0 pi* (bias: KL to pi* flattens)",
         "dpo_uniform_ref": "wiring check: = pmle by construction"}


@dataclass
class RateConfig:
    n_contexts: int = 4
    n_responses: int = 8
    gamma: float = 1.0
    sigma: float = 1.5
    ref_sigma: float = 1.0
    rkl_beta: float = 0.5
    rlhf_beta: float = 1.0
    ns: tuple = (250, 500, 1000, 2000, 4000, 8000, 16000)
    n_seeds: int = 30
    prior: float = tf.DEFAULT_PRIOR
    slope_min_n: int = 2000


QUICK = dict(ns=(1000, 2000, 4000, 8000, 16000), n_seeds=12, slope_min_n=1000)


def targets(problem: tb.TabularProblem, cfg: RateConfig) -> dict[str, torch.Tensor]:
    """Each objective's closed-form population minimiser pi_inf, as log-probs (X, K)."""
    true_reward = cfg.gamma * problem.target_logps
    ref_probs = problem.ref_logps.exp()
    rkl = reverse_kl_optimum(ref_probs, true_reward, cfg.rkl_beta, cfg.gamma).log()
    rlhf = reverse_kl_optimum(ref_probs, true_reward, cfg.rlhf_beta, 0.0).log()
    dpo = torch.log_softmax(problem.ref_logps + true_reward / cfg.gamma, -1)   # beta = gamma
    out = {name: problem.target_logps for name in ("pmle", "distill_fitted", "distill_true", "dpo_uniform_ref",
                                                   "reverse_kl_beta0")}
    return dict(out, reverse_kl=rkl, rlhf=rlhf, dpo=dpo)


def fit_all(problem: tb.TabularProblem, cfg: RateConfig, wins_list: list, priors: list) -> list[dict]:
    """Every objective on every dataset (S, X, K, K), in two joint Newton runs; a list of {name: logps}."""
    uniform_ref = torch.zeros_like(problem.ref_logps) - np.log(cfg.n_responses)
    true_reward = cfg.gamma * problem.target_logps
    first = []
    for wins, prior in zip(wins_list, priors):
        first += [tf.bt_reward_fit(wins, prior), tf.pmle_fit(wins, cfg.gamma, prior),
                  tf.dpo_fit(wins, uniform_ref, cfg.gamma, prior), tf.distill_fit(wins, true_reward, cfg.gamma),
                  tf.dpo_fit(wins, problem.ref_logps, cfg.gamma, prior)]
    first_out = tf.solve(first)
    second = []
    for i, wins in enumerate(wins_list):
        reward = first_out[5 * i]
        second += [tf.distill_fit(wins, reward, cfg.gamma),
                   tf.reverse_kl_fit(reward, problem.ref_logps, cfg.rkl_beta, cfg.gamma),
                   tf.reverse_kl_fit(reward, problem.ref_logps, cfg.rlhf_beta, 0.0),
                   tf.reverse_kl_fit(reward, problem.ref_logps, 0.0, cfg.gamma)]
    second_out = tf.solve(second)
    return [dict(pmle=first_out[5 * i + 1], dpo_uniform_ref=first_out[5 * i + 2], distill_true=first_out[5 * i + 3],
                 dpo=first_out[5 * i + 4], distill_fitted=second_out[4 * i], reverse_kl=second_out[4 * i + 1],
                 rlhf=second_out[4 * i + 2], reverse_kl_beta0=second_out[4 * i + 3])
            for i in range(len(wins_list))]


def run_sweep(cfg: RateConfig, seed: int = 0) -> dict:
    """Sample, fit and score every (objective, n, seed); returns per-objective KL arrays (len(ns), S)."""
    problem = tb.make_problem(cfg.n_contexts, cfg.n_responses, cfg.sigma, cfg.gamma, seed, cfg.ref_sigma)
    mu = tb.uniform_mu(cfg.n_contexts, cfg.n_responses)
    pref = tb.bt_pref_prob(problem.target_logps, cfg.gamma)
    gen = torch.Generator().manual_seed(seed + 1)
    wins_list = [tb.sample_wins(mu, pref, n, cfg.n_seeds, gen) for n in cfg.ns]
    population = tb.expected_wins(mu, pref)[None]
    fits = fit_all(problem, cfg, wins_list + [population], [cfg.prior] * len(cfg.ns) + [0.0])
    pi_inf = targets(problem, cfg)
    kl_inf = {name: np.stack([(tb.kl(fit[name], pi_inf[name]) if name in REVERSE_METRIC
                               else tb.kl(pi_inf[name], fit[name])).numpy() for fit in fits[:-1]])
              for name in OBJECTIVES}
    kl_star = {name: np.stack([tb.kl(problem.target_logps, fit[name]).numpy() for fit in fits[:-1]])
               for name in OBJECTIVES}
    population_error = {name: float((fits[-1][name][0].exp() - pi_inf[name].exp()).abs().max())
                        for name in OBJECTIVES}
    dpo_minus_pmle = max(float((f["dpo_uniform_ref"] - f["pmle"]).abs().max()) for f in fits)
    return dict(problem=problem, kl_inf=kl_inf, kl_star=kl_star, pi_inf=pi_inf,
                population_error=population_error, dpo_minus_pmle=dpo_minus_pmle,
                dpo_floor=float(tb.kl(problem.target_logps, pi_inf["dpo"])))


def summarise(cfg: RateConfig, sweep: dict, seed: int) -> dict:
    ns = np.asarray(cfg.ns, float)
    large = ns >= cfg.slope_min_n
    per_objective, slopes = {}, {}
    for name in OBJECTIVES:
        per_seed = sweep["kl_inf"][name]
        per_objective[name] = {str(n): dict(mean_kl=float(row.mean()), sem=float(row.std(ddof=1) / np.sqrt(row.size)),
                                            n_times_kl=float(n * row.mean()), kl_per_seed=row.tolist(),
                                            mean_kl_to_target=float(sweep["kl_star"][name][i].mean()))
                               for i, (n, row) in enumerate(zip(cfg.ns, per_seed))}
        if name != "distill_true":
            slope, low, high = bootstrap_slope(ns[large], per_seed[large], seed=seed)
            slopes[name] = dict(slope=slope, ci95=[low, high], n_min=cfg.slope_min_n)
    return dict(objectives=per_objective, slopes=slopes)


def write_outputs(out_dir: Path, cfg: RateConfig, sweep: dict, summary: dict, elapsed: float) -> None:
    rows = [[name, n, v["mean_kl"], v["sem"], v["n_times_kl"], v["mean_kl_to_target"]]
            for name, by_n in summary["objectives"].items() for n, v in by_n.items()]
    slope_rows = [[name, s["slope"], f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]",
                   "yes" if name in RATE_CLAIMED else "no", CLAIM.get(name, "")]
                  for name, s in summary["slopes"].items()]
    write_table(out_dir, [
        (f"E KL(pi_inf || pi_hat_n) (reverse_kl_beta0: E KL(pi_hat_n || pi*)), {cfg.n_seeds} seeds "
         f"(sweep took {elapsed:.2f} s)",
         markdown_table(["objective", "n", "mean KL", "s.e.", "n * KL", "KL(pi*||pi_hat)"], rows)),
        (f"log-log slope over n >= {cfg.slope_min_n} (95% bootstrap over seeds)",
         markdown_table(["objective", "slope", "95% CI", "seed 001 claims O(1/n)", "what the row measures"],
                        slope_rows)),
        ("checks", markdown_table(["check", "value"], [
            ["max abs(dpo_uniform_ref - pmle) in log-prob (wiring check: equal by construction)",
             sweep["dpo_minus_pmle"]],
            ["DPO's floor KL(pi* || pi_inf), pi_inf ∝ pi0 pi*", sweep["dpo_floor"]]]
            + [[f"population fit vs closed-form pi_inf: {k}", v] for k, v in sweep["population_error"].items()]))])
    ns, objectives = list(cfg.ns), summary["objectives"]
    series = {name: (ns, [v["mean_kl"] for v in by_n.values()]) for name, by_n in objectives.items()
              if name != "distill_true"}
    ref_line = objectives["pmle"][str(cfg.ns[0])]["mean_kl"]
    series["slope -1"] = (ns, [ref_line * cfg.ns[0] / n for n in cfg.ns])
    line_plot(out_dir / "rate.png", series, "n (labelled pairs)", "E KL(pi_inf || pi_hat_n)",
              "Tabular rate (log-log); reverse_kl_beta0: KL(pi_hat || pi*)", loglog=True, reference=("slope -1",),
              note=SAME_ESTIMATE)
    nkl = {name: (ns, [v["n_times_kl"] for v in by_n.values()])
           for name, by_n in objectives.items() if name != "distill_true"}
    line_plot(out_dir / "n_times_kl.png", nkl, "n (labelled pairs)", "n * E KL(pi_inf || pi_hat_n)",
              "n * KL: flat means O(1/n)", loglog=True)
    bias = {"dpo: KL(pi* || pi_hat)": (ns, [v["mean_kl_to_target"] for v in objectives["dpo"].values()]),
            "dpo: KL(pi_inf || pi_hat), own limit": series["dpo"],
            "pmle: KL(pi* || pi_hat)": series["pmle"],
            "dpo floor KL(pi* || pi_inf)": (ns, [sweep["dpo_floor"]] * len(ns))}
    line_plot(out_dir / "dpo_bias.png", bias, "n (labelled pairs)", "E KL", "DPO (reference pi0) estimates "
              "pi_inf ∝ pi0 pi*, not pi*", loglog=True, reference=("dpo floor KL(pi* || pi_inf)",))


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    """Run the sweep, write results.json / table.md / rate.png / n_times_kl.png; returns the results."""
    out_dir = Path(out_dir)
    cfg = RateConfig(**QUICK) if quick else RateConfig()
    start = time.perf_counter()
    sweep = run_sweep(cfg, seed)
    elapsed = time.perf_counter() - start
    print(f"rate: {len(OBJECTIVES)} objectives x {len(cfg.ns)} n x {cfg.n_seeds} seeds in {elapsed:.2f} s")
    summary = summarise(cfg, sweep, seed)
    problem = sweep["problem"]
    results = dict(summary, elapsed_s=elapsed, seed=seed, quick=quick,
                   protocol=dict(asdict(cfg), pair_distribution="x uniform; a, b i.i.d. uniform over K",
                                 labels="a > b w.p. sigmoid(gamma (log pi*(a|x) - log pi*(b|x)))",
                                 reference="pi0 = softmax(N(0, ref_sigma^2)) for reverse_kl / rlhf / dpo; "
                                           "uniform for dpo_uniform_ref"),
                   target_logps=problem.target_logps, ref_logps=problem.ref_logps,
                   pi_inf_logps=sweep["pi_inf"], population_error=sweep["population_error"],
                   dpo_minus_pmle=sweep["dpo_minus_pmle"], dpo_floor=sweep["dpo_floor"])
    write_results(out_dir, results)
    write_outputs(out_dir, cfg, sweep, summary, elapsed)
    return results
