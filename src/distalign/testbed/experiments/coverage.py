"""`distalign testbed coverage`: on-policy against offline objectives when mu covers part of the responses.

Seed 001 Theorem 7: reverse KL (Eq. 16, beta = 0) pays for coverage only through the reward class
(C_R ln|R|), while PMLE and offline distillation pay C_Pi of the policy class (Theorems 4, 6),
because their policy step sees only the dataset's responses. The advantage needs a reward class
smaller than the policy class (Assumption 5), so this experiment has two reward models:
- linear: R(x, a) = phi(x, a) . theta with d = FEATURES fixed random features per (x, a); pi* =
  softmax(phi . theta*) lies in the class (realisable), and a reward fitted on covered responses
  extrapolates to the uncovered ones through their features;
- tabular: one free reward per (x, a), the policy class itself, as a contrast: nothing it learns
  reaches an uncovered response, so no on-policy advantage can appear there.
Pairs come from mu = uniform over the first `covered` of K responses in every context.
Offline (no reward model): PMLE (beta = 0, limit pi*) and DPO (reference pi0, beta = gamma, limit
∝ pi0 pi*). Offline distillation uses each reward model's soft labels on the dataset's pairs.
On-policy, in exact expectation under pi, from each reward model: reverse KL with beta = 0
(Theorem 7's own setting, limit pi*), RLHF E[R] - beta KL(pi||pi0) with beta = 1 (limit ∝ pi0 pi*,
DPO's), and online distillation (Algorithm 1, beta = 0.1). Pairs compared in the verdict share
their population limit: PMLE with reverse KL, DPO with RLHF,
and offline distillation with reverse KL from the same reward model (Theorem 6 against Theorem 7:
the reward step is shared, only the policy step sees mu's responses or the policy's own).
Protocol checks in the table: realisability (the linear class recovers pi* from population
pairs), full coverage (every method reaches its own limit up to the estimation error), the reward
fit's final gradient, equal n and seeds for every method. Nothing was tuned: beta = 0 and beta = gamma
come from the theorems, the rest are the defaults below, fixed before the first run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from distalign.objectives import reverse_kl_optimum

from .. import tabular as tb
from .. import tabular_fit as tf
from ..plotting import line_plot, markdown_table, write_results, write_table

CONTEXTS, RESPONSES, FEATURES, TARGET_SCALE = 4, 8, 3, 1.5
RLHF_BETA, DISTILL_BETA = 1.0, 0.1
ONLINE_ROUNDS = 5  # the same number of Algorithm-1 rounds for the estimate and its target
OFFLINE = ("pmle", "dpo")
WITH_REWARD = ("offline_distill", "reverse_kl_beta0", "rlhf", "online_distill")
ON_POLICY = ("reverse_kl_beta0", "rlhf", "online_distill")
REWARD_CLASSES = ("linear", "tabular")
# (offline, on-policy) with the same population limit; {} is the reward class. The last pair uses one
# reward model for both: only the policy step differs (dataset pairs vs the policy's own samples).
PAIRED = (("offline/pmle", "{}/reverse_kl_beta0"), ("offline/dpo", "{}/rlhf"),
          ("{}/offline_distill", "{}/reverse_kl_beta0"))


def make_problem(seed: int) -> tuple[tb.TabularProblem, torch.Tensor]:
    """pi* = softmax(phi . theta*) with phi (X, K, d) ~ N(0, 1) and theta* ~ N(0, s^2 / d), pi0 random."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    features = torch.randn(CONTEXTS, RESPONSES, FEATURES, generator=gen, dtype=tb.DTYPE)
    theta = TARGET_SCALE / FEATURES ** 0.5 * torch.randn(FEATURES, generator=gen, dtype=tb.DTYPE)
    problem = tb.make_problem(CONTEXTS, RESPONSES, gamma=1.0, seed=seed, ref_sigma=1.0, target_logits=features @ theta)
    return problem, features


def reward_models(wins: torch.Tensor, features: torch.Tensor) -> tuple[dict, float]:
    """{class: rewards (S, X, K)} and the linear fit's final max |gradient|."""
    linear = tf.feature_reward_fit(wins, features)
    return {"linear": linear.rewards, "tabular": tf.solve([tf.bt_reward_fit(wins)])[0]}, linear.grad_max


def fit_with_reward(problem: tb.TabularProblem, wins: torch.Tensor, reward: torch.Tensor) -> dict:
    gamma, ref = problem.gamma, problem.ref_logps
    distill, rkl, rlhf = tf.solve([tf.distill_fit(wins, reward, gamma), tf.reverse_kl_fit(reward, ref, 0.0, gamma),
                                   tf.reverse_kl_fit(reward, ref, RLHF_BETA, 0.0)])
    online = tf.fit_online_distill(reward, ref, gamma, DISTILL_BETA, rounds=ONLINE_ROUNDS)
    return dict(offline_distill=distill, reverse_kl_beta0=rkl, rlhf=rlhf, online_distill=online)


def fit_at_coverage(problem: tb.TabularProblem, features: torch.Tensor, wins: torch.Tensor) -> tuple[dict, float]:
    """{"offline": {method: logps}, "linear": {...}, "tabular": {...}} (S, X, K) and the reward gradient."""
    pmle, dpo = tf.solve([tf.pmle_fit(wins, problem.gamma), tf.dpo_fit(wins, problem.ref_logps, problem.gamma)])
    rewards, grad_max = reward_models(wins, features)
    fits = {"offline": dict(pmle=pmle, dpo=dpo)}
    for name, reward in rewards.items():
        fits[name] = fit_with_reward(problem, wins, reward)
    return fits, grad_max


def full_coverage_targets(problem: tb.TabularProblem) -> dict:
    """Population minimisers with every response covered, from the true reward gamma log pi*."""
    reward = problem.gamma * problem.target_logps
    ref_probs = problem.ref_logps.exp()
    online = tf.fit_online_distill(reward[None], problem.ref_logps, problem.gamma, DISTILL_BETA,
                                   rounds=ONLINE_ROUNDS)[0]
    rlhf = reverse_kl_optimum(ref_probs, reward, RLHF_BETA, 0.0).log()
    return dict(pmle=problem.target_logps, offline_distill=problem.target_logps, reverse_kl_beta0=problem.target_logps,
                dpo=torch.log_softmax(problem.ref_logps + problem.target_logps, -1), rlhf=rlhf, online_distill=online)


def realisability_error(problem: tb.TabularProblem, features: torch.Tensor) -> float:
    """Max |softmax(R_inf / gamma) - pi*| for the linear reward fitted on population pairs under full coverage."""
    mu = tb.uniform_mu(*problem.shape)
    population = tb.expected_wins(mu, tb.bt_pref_prob(problem.target_logps, problem.gamma))[None]
    reward = tf.feature_reward_fit(population, features).rewards[0]
    return float((torch.softmax(reward / problem.gamma, -1) - problem.target_logps.exp()).abs().max())


def score(problem: tb.TabularProblem, logps: torch.Tensor, target: torch.Tensor, covered: int) -> dict:
    return dict(kl_target=float(tb.kl(problem.target_logps, logps).mean()),
                kl_reverse=float(tb.kl(logps, problem.target_logps).mean()),
                kl_pi_inf=float(tb.kl(target, logps).mean()),
                uncovered_mass=float(logps[..., covered:].exp().sum(-1).mean()))


def sweep(problem, features, coverages, n, n_seeds, seed) -> tuple[dict, list]:
    targets = full_coverage_targets(problem)
    pref = tb.bt_pref_prob(problem.target_logps, problem.gamma)
    gen = torch.Generator().manual_seed(seed + 1)
    results, grads = {}, []
    for covered in coverages:
        wins = tb.sample_wins(tb.restricted_mu(*problem.shape, covered), pref, n, n_seeds, gen)
        with tf.single_thread():
            fits, grad_max = fit_at_coverage(problem, features, wins)
        grads.append(grad_max)
        entry = {f"{group}/{m}": score(problem, logps, targets[m], covered)
                 for group, by_method in fits.items() for m, logps in by_method.items()}
        entry["target_uncovered_mass"] = float(problem.target_logps[:, covered:].exp().sum(-1).mean())
        entry["ref_uncovered_mass"] = float(problem.ref_logps[:, covered:].exp().sum(-1).mean())
        results[str(covered)] = entry
    return results, grads


def verdict(results: dict, coverages) -> list[str]:
    """Per reward class, at the poorest and at full coverage: does each on-policy method beat the
    offline method with the same population limit, on KL to that limit?"""
    worst, full = str(min(coverages)), str(max(coverages))
    lines = []
    for reward_class in REWARD_CLASSES:
        for offline, online in PAIRED:
            off_key, on_key = offline.format(reward_class), online.format(reward_class)
            off, on = (results[worst][k]["kl_pi_inf"] for k in (off_key, on_key))
            off_full, on_full = (results[full][k]["kl_pi_inf"] for k in (off_key, on_key))
            lines.append(f"{reward_class} reward, {worst}/{RESPONSES} responses covered: {on_key} "
                         f"KL(pi_inf||pi_hat) {on:.4f} vs {off_key} {off:.4f}: on-policy "
                         f"{'BEATS' if on < off else 'does NOT beat'} offline ({off / on:.1f}x); "
                         f"at full coverage {on_full:.4f} vs {off_full:.4f} ({off_full / on_full:.1f}x).")
    return lines


def write_outputs(out_dir: Path, results: dict, coverages, n, n_seeds, checks: dict, lines: list[str]) -> None:
    rows = []
    for covered in coverages:
        entry = results[str(covered)]
        for key, v in entry.items():
            if isinstance(v, dict):
                group, method = key.split("/")
                rows.append([covered, method, group, v["kl_target"], v["kl_reverse"], v["kl_pi_inf"], v["uncovered_mass"]])
        rows.append([covered, "(pi* / pi0 mass there)", "-", "-", "-", "-",
                     f"{entry['target_uncovered_mass']:.4f} / {entry['ref_uncovered_mass']:.4f}"])
    write_table(out_dir, [
        (f"Coverage sweep, n = {n}, {n_seeds} seeds, K = {RESPONSES}, linear reward class d = {FEATURES}",
         markdown_table(["covered", "method", "reward model", "KL(pi*||pi_hat)", "KL(pi_hat||pi*)",
                         "KL(pi_inf||pi_hat)", "uncovered mass"], rows)),
        ("What the data shows (pairs share a population limit)", "\n".join(f"- {line}" for line in lines)),
        ("Protocol checks", markdown_table(["check", "value"], [[k, v] for k, v in checks.items()]))])
    xs = list(coverages)
    for reward_class in REWARD_CLASSES:
        keys = [f"offline/{m}" for m in OFFLINE] + [f"{reward_class}/{m}" for m in WITH_REWARD]
        line_plot(out_dir / f"kl_pi_inf_{reward_class}.png",
                  {k: (xs, [results[str(c)][k]["kl_pi_inf"] for c in xs]) for k in keys},
                  f"responses covered by mu (of {RESPONSES})", "mean KL(pi_inf || pi_hat)",
                  f"Coverage, {reward_class} reward model: KL to each method's own limit", logy=True)
    mass = {k: (xs, [results[str(c)][k]["uncovered_mass"] for c in xs])
            for k in [f"offline/{m}" for m in OFFLINE] + [f"linear/{m}" for m in WITH_REWARD]}
    mass["pi*"] = (xs, [results[str(c)]["target_uncovered_mass"] for c in xs])
    mass["pi0"] = (xs, [results[str(c)]["ref_uncovered_mass"] for c in xs])
    line_plot(out_dir / "uncovered_mass.png", mass, f"responses covered by mu (of {RESPONSES})",
              "mass on uncovered responses", "Where the estimate puts mass the data never saw (linear reward)",
              reference=("pi*", "pi0"))


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    n, n_seeds = (2000, 6) if quick else (4000, 20)
    coverages = (8, 4, 2) if quick else (8, 6, 4, 3, 2)
    problem, features = make_problem(seed)
    results, grads = sweep(problem, features, coverages, n, n_seeds, seed)
    checks = {"realisability: max |softmax(R_linear,inf) - pi*| (population, full coverage)":
              realisability_error(problem, features),
              "linear reward fit: largest final |gradient| over coverages": max(grads),
              "n and seeds": f"n = {n}, {n_seeds} seeds, the same data for every method"}
    lines = verdict(results, coverages)
    write_outputs(out_dir, results, coverages, n, n_seeds, checks, lines)
    summary = dict(results=results, n=n, n_seeds=n_seeds, coverages=coverages, seed=seed, quick=quick,
                   betas=dict(rlhf=RLHF_BETA, reverse_kl=0.0, online_distill=DISTILL_BETA, dpo=problem.gamma),
                   features=features, checks=checks, verdict=lines,
                   target_logps=problem.target_logps, ref_logps=problem.ref_logps)
    write_results(out_dir, summary)
    print("coverage: " + " ".join(lines))
    return summary
