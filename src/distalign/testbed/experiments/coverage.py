"""`distalign testbed coverage`: on-policy against offline objectives when mu covers part of the responses.

Pairs are drawn from mu = uniform over the first `covered` of K responses in every context; the
other responses never appear in the data. Offline: PMLE (beta = 0) and DPO (reference pi0, beta =
gamma), both initialised as usual (PMLE at uniform logits, DPO at pi0). On-policy, in exact
expectation under pi: RLHF (E[Rhat] - beta KL), reverse KL (Eq. 16) and online preference
distillation (Algorithm 1 with beta KL), all from a Bradley-Terry reward Rhat fitted on the same pairs.

What the tabular world can and cannot show: nothing generalises across table cells, so every
estimate is *unidentified* on uncovered responses. Offline objectives leave those logits where they
started; the reward model leaves Rhat there at its initial value (0 before centring), and the
on-policy objectives then weigh uncovered responses by pi0 and that value. The table reports, per
coverage level, KL(pi* || pi_hat), KL(pi_inf || pi_hat) to each objective's full-coverage target, and
the mass on uncovered responses next to pi*'s and pi0's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from distalign.objectives import reverse_kl_optimum

from .. import tabular as tb
from .. import tabular_fit as tf
from ..plotting import line_plot, markdown_table, write_results, write_table

RLHF_BETA, RKL_BETA, DISTILL_BETA = 1.0, 0.5, 0.1
ONLINE_ROUNDS = 5  # the same number of Algorithm-1 rounds for the estimate and its target
OBJECTIVES = ("pmle", "dpo", "rlhf", "reverse_kl", "online_distill")


def fit_at_coverage(problem: tb.TabularProblem, wins: torch.Tensor) -> dict:
    """Every objective on one coverage level's datasets (S, X, K, K); {name: log-probs (S, X, K)}."""
    gamma = problem.gamma
    reward, pmle, dpo = tf.solve([tf.bt_reward_fit(wins), tf.pmle_fit(wins, gamma),
                                  tf.dpo_fit(wins, problem.ref_logps, gamma)])
    rlhf, rkl = tf.solve([tf.reverse_kl_fit(reward, problem.ref_logps, RLHF_BETA, 0.0),
                          tf.reverse_kl_fit(reward, problem.ref_logps, RKL_BETA, gamma)])
    online = tf.fit_online_distill(reward, problem.ref_logps, gamma, DISTILL_BETA, rounds=ONLINE_ROUNDS)
    return dict(pmle=pmle, dpo=dpo, rlhf=rlhf, reverse_kl=rkl, online_distill=online)


def full_coverage_targets(problem: tb.TabularProblem) -> dict:
    """Population minimisers with every response covered, from the true reward gamma log pi*."""
    reward = problem.gamma * problem.target_logps
    ref_probs = problem.ref_logps.exp()
    online = tf.fit_online_distill(reward[None], problem.ref_logps, problem.gamma, DISTILL_BETA, rounds=ONLINE_ROUNDS)[0]
    dpo = torch.log_softmax(problem.ref_logps + problem.target_logps, -1)  # beta = gamma
    return dict(pmle=problem.target_logps, dpo=dpo,
                rlhf=reverse_kl_optimum(ref_probs, reward, RLHF_BETA, 0.0).log(),
                reverse_kl=reverse_kl_optimum(ref_probs, reward, RKL_BETA, problem.gamma).log(),
                online_distill=online)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    n, n_seeds = (2000, 6) if quick else (4000, 20)
    coverages = (8, 4, 2) if quick else (8, 6, 4, 3, 2)
    problem = tb.make_problem(4, 8, sigma=1.5, gamma=1.0, seed=seed, ref_sigma=1.0)
    pref = tb.bt_pref_prob(problem.target_logps, problem.gamma)
    targets = full_coverage_targets(problem)
    gen = torch.Generator().manual_seed(seed + 1)
    results, rows = {}, []
    for covered in coverages:
        mu = tb.restricted_mu(*problem.shape, covered)
        with tf.single_thread():
            fits = fit_at_coverage(problem, tb.sample_wins(mu, pref, n, n_seeds, gen))
        uncovered = slice(covered, None)
        entry = {}
        for name in OBJECTIVES:
            logps = fits[name]
            entry[name] = dict(kl_target=float(tb.kl(problem.target_logps, logps).mean()),
                               kl_pi_inf=float(tb.kl(targets[name], logps).mean()),
                               uncovered_mass=float(logps[..., uncovered].exp().sum(-1).mean()))
            rows.append([covered, name, entry[name]["kl_target"], entry[name]["kl_pi_inf"],
                         entry[name]["uncovered_mass"]])
        entry["target_uncovered_mass"] = float(problem.target_logps[:, uncovered].exp().sum(-1).mean())
        entry["ref_uncovered_mass"] = float(problem.ref_logps[:, uncovered].exp().sum(-1).mean())
        rows.append([covered, "(pi* / pi0 mass there)", "-", "-",
                     f"{entry['target_uncovered_mass']:.4f} / {entry['ref_uncovered_mass']:.4f}"])
        results[str(covered)] = entry
    xs = list(coverages)
    for key, label in (("kl_target", "mean KL(pi* || pi_hat)"), ("kl_pi_inf", "mean KL(pi_inf || pi_hat)")):
        line_plot(out_dir / f"{key}.png", {m: (xs, [results[str(c)][m][key] for c in xs]) for m in OBJECTIVES},
                  "responses covered by mu (of 8)", label, f"Coverage: {label}", logy=True)
    mass = {m: (xs, [results[str(c)][m]["uncovered_mass"] for c in xs]) for m in OBJECTIVES}
    mass["pi*"] = (xs, [results[str(c)]["target_uncovered_mass"] for c in xs])
    mass["pi0"] = (xs, [results[str(c)]["ref_uncovered_mass"] for c in xs])
    line_plot(out_dir / "uncovered_mass.png", mass, "responses covered by mu (of 8)",
              "mass on uncovered responses", "Where the estimate puts mass the data never saw")
    write_table(out_dir, [(f"Coverage sweep, n = {n}, {n_seeds} seeds", markdown_table(
        ["covered", "objective", "KL(pi*, pi_hat)", "KL(pi_inf, pi_hat)", "uncovered mass"], rows))])
    summary = dict(results=results, n=n, n_seeds=n_seeds, coverages=coverages, seed=seed, quick=quick,
                   betas=dict(rlhf=RLHF_BETA, reverse_kl=RKL_BETA, online_distill=DISTILL_BETA),
                   target_logps=problem.target_logps, ref_logps=problem.ref_logps,
                   note="tabular cells do not generalise: uncovered responses are unidentified for every "
                        "objective; see the module docstring")
    write_results(out_dir, summary)
    return summary
