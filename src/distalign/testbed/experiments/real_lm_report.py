"""Outputs of `testbed real-lm`: table.md, results.json, two PNGs and report.md.

The report compares each pair of seed 001's Table 2 with what was measured. The paper's claim for a
pair is that the distribution-learning method matches or beats its counterpart in win-rate; here a
claim counts as "supported" when the difference is above -2 standard errors of the difference (it
matches or beats), "not supported" when it is below (the counterpart wins clearly). The same rule is
applied to exact KL(pi*||pi), the quantity the framework says these methods estimate, which the paper
could not measure; there the error is of the paired difference (both rows scored on the same pi* samples).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..plotting import loglog_slope, markdown_table, write_results
from .real_lm_eval import paired_kl_difference

COLUMNS = [("KL(pi*||pi)", "kl_target_to_policy"), ("KL(pi||pi0)", "kl_policy_to_ref"),
           ("KL(pi||pi*)", "kl_policy_to_target"), ("win-rate vs pi0", "win_rate"), ("RM score", "rm_score"),
           ("French share", "french_share")]
PAIRS = [("pmle", "dpo"), ("distillation (RM)", "rebel (RM)"), ("distillation (oracle)", "rebel (oracle)"),
         ("reverse kl paper (RM)", "rlhf ppo (RM)"), ("reverse kl target (RM)", "rlhf ppo (RM)"),
         ("reverse kl paper (oracle)", "rlhf ppo (oracle)"), ("reverse kl target (oracle)", "rlhf ppo (oracle)")]
# Table 2 of seed 001, win-rate by GPT-4 (Pythia 1.4B, 2.8B), for the side-by-side in the report.
PAPER = {"dpo": (45.0, 50.6), "pmle": (46.0, 48.6), "rebel": (59.5, 70.1), "distillation": (62.5, 75.8),
         "rlhf ppo": (60.0, 74.0), "reverse kl": (61.5, 74.6)}


def _pm(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    err = row.get(f"{key}_stderr")
    return f"{value:.3f} ± {err:.3f}" if err is not None and math.isfinite(err) else f"{value:.3f}"


def results_table(rows: dict) -> str:
    header = ["method", "lr"] + [c for c, _ in COLUMNS] + ["truncated"]
    body = [[name, f"{row['learning_rate']:g}" if "learning_rate" in row else "-"]
            + [_pm(row, key) for _, key in COLUMNS] + [f"{row['truncated_share']:.2f}"] for name, row in rows.items()]
    return markdown_table(header, body)


def rate_table(rate: dict) -> str:
    """One row per (method, n): where the stopping rule stopped, the empirical and held-out objectives
    beside pi*'s own on the same pairs (is the fit to pi* or to the draws?), and the epoch the held-out
    objective would have picked; the slope is of log KL at the stop against log n."""
    body = []
    for method, by_n in rate.items():
        ns = sorted(by_n, key=int)
        slope = loglog_slope([int(n) for n in ns], [max(by_n[n]["kl_target_to_policy"], 1e-9) for n in ns]) \
            if len(ns) > 1 else math.nan
        for n in ns:
            r, history = by_n[n], by_n[n]["history"]
            curve = " → ".join(f"{h['kl_target_to_policy']:.2f}" for h in history)
            best = history[r["best_heldout_epoch"]]           # history[i] is epoch i
            target = r.get("target_objective")
            body.append([method, n, r["epochs"], "yes" if r["converged"] else "no (epoch cap)",
                         f"{history[0]['objective']:.3f} → {history[-1]['objective']:.3f}"
                         + (f" (pi*: {target:.3f})" if target is not None else ""),
                         f"{best['heldout_objective']:.3f} at epoch {best['epoch']}"
                         + (f" (pi*: {r['target_heldout_objective']:.3f})" if "target_heldout_objective" in r else ""),
                         _pm(r, "kl_target_to_policy"), _pm(r, "moved_from_pi0"),
                         f"{r['kl_at_best_heldout']:.3f}", curve, slope])
    return markdown_table(["method", "n pairs", "epochs", "converged", "empirical objective pi0 → stop",
                           "held-out objective, best", "KL(pi*||pi_n) at stop", "moved from pi0 (paired)",
                           "KL at best held-out epoch", "KL per epoch (0 = pi0)", "log-log slope"], body)


def rate_plot(out: Path, rate: dict, start: float) -> None:
    """KL(pi*||pi_n) against n (log x) per method, at the stopping rule's stop and (dashed) at the epoch with
    the lowest held-out objective; grey: pi0's KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for method, by_n in rate.items():
        ns = sorted(by_n, key=int)
        line = ax.errorbar([int(n) for n in ns], [by_n[n]["kl_target_to_policy"] for n in ns],
                           yerr=[by_n[n].get("moved_from_pi0_stderr") or 0.0 for n in ns], marker="o", capsize=3,
                           label=f"{method}, at the stop")
        ax.plot([int(n) for n in ns], [by_n[n]["kl_at_best_heldout"] for n in ns], marker="s", linestyle="--",
                color=line[0].get_color(), label=f"{method}, at the best held-out epoch")
    ax.axhline(start, color="grey", linestyle="--", linewidth=0.8, label="pi0 (start)")
    ax.set_xscale("log")
    ns = sorted({int(n) for by_n in rate.values() for n in by_n})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("n preference pairs (stopping rule: < 1% per epoch, or the epoch cap)")
    ax.set_ylabel("exact KL(pi*||pi_n), nats per response")
    ax.set_title("Rate on SmolLM2 (error bars: paired standard error of the change from pi0)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rate_kl_vs_n.png", dpi=110)
    plt.close(fig)


def compare(rows: dict, ours: str, theirs: str, key: str, higher_is_better: bool) -> dict | None:
    if ours not in rows or theirs not in rows or rows[ours].get(key) is None:
        return None
    a, b = rows[ours], rows[theirs]
    diff = (a[key] - b[key]) * (1 if higher_is_better else -1)
    err = math.hypot(a.get(f"{key}_stderr", 0.0) or 0.0, b.get(f"{key}_stderr", 0.0) or 0.0)
    paired = paired_kl_difference(a, b) if key == "kl_target_to_policy" else None
    if paired is not None:      # both scored on the same pi* samples: the difference's own error
        err = paired[1]
    return {"ours": a[key], "theirs": b[key], "advantage": diff, "stderr": err, "supported": diff > -2 * err,
            "clear_win": diff > 2 * err, "paired": paired is not None}


def comparisons(rows: dict) -> list[dict]:
    out = []
    for ours, theirs in PAIRS:
        win = compare(rows, ours, theirs, "win_rate", True)
        if win is None:
            continue
        out.append({"ours": ours, "theirs": theirs, "win_rate": win,
                    "kl_target": compare(rows, ours, theirs, "kl_target_to_policy", False),
                    "kl_ref": compare(rows, ours, theirs, "kl_policy_to_ref", False)})
    return out


def _verdict(c: dict | None, what: str) -> str:
    if c is None:
        return f"{what}: not measured"
    word = "beats" if c["clear_win"] else "matches" if c["supported"] else "loses to"
    paired = ", paired on the same pi* samples" if c.get("paired") else ""
    return (f"{what} {c['ours']:.3f} vs {c['theirs']:.3f} (advantage {c['advantage']:+.3f} ± {c['stderr']:.3f}"
            f"{paired}): {word}")


def movement_lines(rows: dict) -> list[str]:
    """Each row's KL(pi*||pi) minus pi0's, with the paired error: did the method move toward pi* at all?"""
    start, lines = rows.get("pi0 (start)"), []
    for name, row in rows.items():
        moved = paired_kl_difference(row, start) if start is not None and name != "pi0 (start)" else None
        if moved is not None:
            word = "closer to pi*" if moved[0] < -2 * moved[1] else "farther" if moved[0] > 2 * moved[1] else "no change"
            lines.append(f"- {name}: {moved[0]:+.3f} ± {moved[1]:.3f} nats ({word})")
    return lines


def comparison_lines(rows: dict) -> list[str]:
    lines = []
    for c in comparisons(rows):
        claim = "supported" if c["win_rate"]["supported"] else "NOT supported"
        lines.append(f"- **{c['ours']} vs {c['theirs']}** — the paper's win-rate claim is {claim} here. "
                     f"{_verdict(c['win_rate'], 'Win-rate vs pi0')}; {_verdict(c['kl_target'], 'exact KL(pi*||pi)')}; "
                     f"{_verdict(c['kl_ref'], 'KL(pi||pi0)')}.")
    return lines


def plots(out: Path, rows: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    for i, name in enumerate(names):
        r = rows[name]
        marker = "s" if "oracle" in name else "^" if "(RM)" in name else "o"
        ax.errorbar(r["kl_policy_to_ref"], r["win_rate"], xerr=r["kl_policy_to_ref_stderr"],
                    yerr=r["win_rate_stderr"], fmt=marker, markersize=5, capsize=2, label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("KL(pi||pi0), nats per response (policy's own samples)")
    ax.set_ylabel("win-rate vs pi0 (exact oracle P*)")
    ax.set_title("Win-rate against KL to the start (squares: oracle reward, triangles: learned RM)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "winrate_vs_kl.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    values = [rows[n]["kl_target_to_policy"] for n in names]
    errors = [rows[n].get("kl_target_to_policy_stderr", 0.0) for n in names]
    ax.barh(range(len(names)), values, xerr=errors, color=["grey" if n.startswith("pi") else "C0" for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(rows["pi0 (start)"]["kl_target_to_policy"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("exact KL(pi*||pi), nats per response (Monte Carlo on pi* samples; dashed: pi0)")
    ax.set_title("Distance to the target per method")
    fig.tight_layout()
    fig.savefig(out / "kl_target_per_method.png", dpi=110)
    plt.close(fig)


def _samples(rows: dict) -> str:
    parts = []
    for name, row in rows.items():
        lines = [f"### {name}"] + [f"- *{s['prompt']}* → {s['response']!r}" for s in row.get("samples", [])]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _reading_win_rate(rows: dict) -> str:
    """Why win-rate and KL(pi*||pi) can disagree here, with the pi* row's own number."""
    star = rows.get("pi* (target)", {}).get("win_rate")
    own = f" (pi* itself: {star:.3f})" if star is not None else ""
    return ("Reading the win-rate: the judge P*(a > b) = sigmoid(gamma (log pi*(a) - log pi*(b))) prefers the "
            "pi*-likelier response, so it is maximised by pi*'s mode, not by pi*" + own + "; a policy sharper than "
            "pi* (the RLHF optimum pi0 pi*^(gamma / kl_coef)) can win more while being farther from pi* in "
            "KL(pi*||pi). Win-rate is the paper's yardstick; KL(pi*||pi) is the one the distribution-learning view "
            "says these methods estimate.")


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows, world, data = results["rows"], results["world"], results["data"]
    table = results_table(rows)
    rate = rate_table(results["rate"]) if results["rate"] else "(not run)"
    sections = [("Methods on the held-out prompts (mean ± standard error)", table), ("Rate: KL(pi*||pi_n) against n", rate)]
    (out / "table.md").write_text("\n\n".join(f"## {t}\n\n{b}" for t, b in sections) + "\n")
    write_results(out, {**results, "comparisons": comparisons(rows)})
    plots(out, rows)
    if results["rate"]:
        rate_plot(out, results["rate"], rows["pi0 (start)"]["kl_target_to_policy"])
    labels = data["labels"]
    rm = results.get("reward_model_accuracy")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items())
    report = [
        "# Seed 001's Table 2 on SmolLM2 with an exact target",
        f"pi*(y|x) = M(y | S, x) with the hidden system prompt S = {world['system_prompt']!r}; pi0(y|x) = M(y|x) "
        f"(the chat template's default system prompt). Responses are token sequences of at most L = "
        f"{world['max_new_tokens']} new tokens, ended by {world['eos_token']} or cut at L; both models' log-probs of "
        "such sequences are exact, so **every KL below is between these distributions over responses of at most L "
        "tokens**, estimated by Monte Carlo without bias (KL(pi*||pi) on pi* samples, KL(pi||pi0) and KL(pi||pi*) "
        "on the policy's own).",
        f"Labels: sigmoid(gamma (log pi*(a) - log pi*(b))) on two pi0 samples, gamma = {labels['gamma']}: "
        f"{labels['share_informative']:.1%} of the {labels['n']} pairs have P* in [0.1, 0.9]; mean label entropy "
        f"{labels['label_entropy_nats']:.3f} nats (a coin flip is 0.693); median |log pi*(a) - log pi*(b)| "
        f"{labels['median_abs_margin']:.1f} nats; {data['truncated_share_pi0']:.0%} of pi0 responses are cut at L.",
        "Reward model accuracy against the exact truth on held-out (pi*, pi0) pairs: "
        + (f"{rm['accuracy']:.3f} ± {rm['stderr']:.3f}." if rm else "not trained."),
        f"Precision: {results['precision']}; the sampler's distribution differs from the exact fp32 model by "
        f"KL(q||pi0) = {data['sampler_gap']['kl_sampler_to_exact']:.4f} ± {data['sampler_gap']['stderr']:.4f} nats "
        f"per response ({data['sampler_gap']['n']} samples; samples of pi* and of each policy are drawn the same way, "
        f"all log-probs are fp32). Seed {results['config']['seed']}; learning rates "
        + ("chosen on the validation split (selected.json)." if results["selected"] else
           "as recorded per row (no selection in this run)."),
        "## Results\n\n" + table, "![win-rate vs KL](winrate_vs_kl.png) ![KL to target](kl_target_per_method.png)",
        "## Table 2's pairs, as measured here\n\n" + "\n".join(comparison_lines(rows) or ["(pairs not run)"]),
        "KL(pi*||pi) minus pi0's, per row (paired on the same pi* samples, ± its standard error):\n\n"
        + "\n".join(movement_lines(rows) or ["(no row keeps its per-sample log-probs)"]),
        _reading_win_rate(rows),
        "Paper (GPT-4 win-rate vs human references, Pythia 1.4B / 2.8B): " + "; ".join(
            f"{k} {a:.1f}% / {b:.1f}%" for k, (a, b) in PAPER.items()),
        "## Rate at this scale\n\n" + rate + ("\n\n![rate](rate_kl_vs_n.png)" if results["rate"] else ""),
        "## Three responses per method\n\n" + _samples(rows),
        f"Stage times: {timings}; total {results['seconds']:.0f} s; peak resident memory of the process "
        f"{max([m['peak_rss_mb'] for m in results.get('memory', {}).values()] or [0])} MB. "
        f"Machine speed at the start: an fp32 forward "
        f"of 8 x 256 tokens took {results['calibration_seconds']:.2f} s (quiet machine: "
        f"{results['calibration_seconds_quiet']:.2f} s).",
    ]
    (out / "report.md").write_text("\n\n".join(report) + "\n")
