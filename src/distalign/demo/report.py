"""Demo outputs: a markdown table (printed and saved), results.json, a win-rate vs KL plot, a report."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [("win_rate_vs_sft", "win-rate vs SFT (oracle)"), ("rm_score", "RM score"),
           ("kl_to_sft", "KL(π‖π_sft)"), ("kl_target_to_policy", "exact KL(π*‖π)"),
           ("off_support", "samples outside π*'s support")]


def _cell(row: dict, key: str) -> str:
    value, err = row.get(key), row.get(f"{key}_stderr")
    if value is None:
        return "–"
    return f"{value:.3f} ± {err:.3f}" if err is not None and err == err else f"{value:.3f}"


def markdown_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, row in results.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, row in results.items():
        if name.startswith("_"):
            continue
        ax.errorbar(row["kl_to_sft"], row["win_rate_vs_sft"], xerr=row["kl_to_sft_stderr"],
                    yerr=row["win_rate_stderr"], fmt="o", capsize=3)
        ax.annotate(name, (row["kl_to_sft"], row["win_rate_vs_sft"]), textcoords="offset points", xytext=(5, 4))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("KL(π ‖ π_sft) on the model's own samples (nats)")
    ax.set_ylabel("win-rate against SFT (exact oracle P*)")
    ax.set_title("distalign demo: every method from the same SFT start")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _findings(results: dict) -> list[str]:
    rows = {k: v for k, v in results.items() if not k.startswith("_") and k not in ("sft", "pi* (target)")}
    closest = min(rows, key=lambda k: rows[k]["kl_target_to_policy"])
    best_win = max(rows, key=lambda k: rows[k]["win_rate_vs_sft"])
    sft_kl = results["sft"]["kl_target_to_policy"]
    lines = [f"- Closest to the target (exact KL(π*‖π)): **{closest}** "
             f"({rows[closest]['kl_target_to_policy']:.3f}, SFT starts at {sft_kl:.3f}).",
             f"- Highest oracle win-rate against SFT: **{best_win}** ({rows[best_win]['win_rate_vs_sft']:.3f}; "
             f"π* itself reaches {results['pi* (target)']['win_rate_vs_sft']:.3f})."]
    worse = [k for k, v in rows.items() if v["kl_target_to_policy"] > sft_kl]
    if worse:
        lines.append(f"- Further from π* than SFT: {', '.join(worse)} (reward over-optimisation or too few steps).")
    lines.append(f"- Reward model agrees with π*'s preference on {results['_reward_model_accuracy']:.1%} of fresh pairs.")
    lines.append("- The oracle's win-rate rewards responses that π* finds likely, so a policy sharper than π* "
                 "(RLHF with small β) can beat π* itself on win-rate while being far from it in KL(π*‖π); "
                 "a large KL(π*‖π) means the policy gives almost no mass to responses π* produces.")
    return lines


def write_outputs(out: Path, results: dict, settings: dict, elapsed: float) -> str:
    table = markdown_table(results)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "settings": settings,
                                                  "wall_time_s": elapsed}, indent=2))
    plot(results, out / "winrate_vs_kl.png")
    report = ["# distalign demo report", "",
              "Every method starts from the same SFT model (trained on samples of the reference π0) and is "
              "evaluated against the world's exact target π*: win-rate against SFT judged by the exact "
              "preference P*(a ≻ b) = σ(γ(log π*(a) − log π*(b))), the learned reward model's score, KL to "
              "the SFT model on the method's own samples, and the exact KL(π*‖π) by enumerating every response.",
              "", table, "", "![win-rate against KL](winrate_vs_kl.png)", "", "## Findings", *_findings(results),
              "", f"Wall time: {elapsed:.0f} s. Settings: `{json.dumps(settings)}`"]
    (out / "report.md").write_text("\n".join(report) + "\n")
    return table
