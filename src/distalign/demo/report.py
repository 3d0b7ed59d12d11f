"""Demo outputs: a markdown table (printed and saved), results.json, a two-panel plot, a report."""
from __future__ import annotations

import json
from pathlib import Path

from .claims import check_claims
from .plot import plot

COLUMNS = [("win_rate_exact", "win-rate vs SFT (exact)"), ("win_rate_vs_sft", "win-rate vs SFT (sampled)"),
           ("rm_score", "RM score"), ("kl_to_sft", "KL(π‖π_sft)"), ("kl_target_to_policy", "exact KL(π*‖π)"),
           ("off_support_mass", "mass off π*'s support")]
REFERENCE_GROUP = "start and target"


def _cell(row: dict, key: str) -> str:
    value, err = row.get(key), row.get(f"{key}_stderr")
    if value is None:
        return "–"
    return f"{value:.3f} ± {err:.3f}" if err is not None and err == err else f"{value:.3f}"


def markdown_table(results: dict, groups: dict[str, str] | None = None) -> str:
    """One line a model; with `groups` ({name: group}) each group under a header line of its own."""
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    current = None
    for name, row in results.items():
        if name.startswith("_"):
            continue
        group = None if groups is None else groups.get(name, REFERENCE_GROUP)
        if group is not None and group != current:
            lines.append(f"| *{group}* |" + " |" * len(COLUMNS))
            current = group
        lines.append(f"| {name} | " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def ordered(results: dict, groups: dict[str, str]) -> dict:
    """The results with the reference rows first, then each group in its first appearance's order."""
    order = list(dict.fromkeys([REFERENCE_GROUP, *groups.values()]))
    names = sorted((n for n in results if not n.startswith("_")),
                   key=lambda n: order.index(groups.get(n, REFERENCE_GROUP)))
    return {**{n: results[n] for n in names}, **{k: v for k, v in results.items() if k.startswith("_")}}


def _findings(results: dict) -> list[str]:
    verdict = {True: "holds", False: "DOES NOT HOLD", None: "not applicable (a row it needs was not trained)"}
    lines = [f"- {verdict[holds]}: {text}" for text, holds in check_claims(results)]
    lines.append(f"- Reward model agrees with π*'s preference on {results['_reward_model_accuracy']:.1%} of fresh "
                 "pairs.")
    return lines


def write_outputs(out: Path, results: dict, settings: dict, elapsed: float,
                  groups: dict[str, str] | None = None) -> str:
    groups = groups or {}
    results = ordered(results, groups)
    table = markdown_table(results, groups)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "groups": groups, "settings": settings,
                                                  "wall_time_s": elapsed}, indent=2))
    plot(results, groups, out / "winrate_vs_kl.png")
    report = ["# distalign demo report", "",
              "Every method starts from the same SFT model (trained on samples of the reference π0) and is "
              "evaluated against the world's exact target π*. Exact, by enumerating every response: the win-rate "
              "against SFT under the oracle preference P*(a ≻ b) = σ(γ(log π*(a) − log π*(b))), KL(π*‖π) and the "
              "mass π puts outside π*'s support. On samples (± one standard error): the same win-rate from one "
              "sample of each side, the learned reward model's score and KL(π‖π_sft) on the model's own samples. "
              "Online methods appear twice: scored by the learned reward model and by the oracle reward γ log π*.",
              "", table, "", "![win-rate against KL](winrate_vs_kl.png)", "", "## Findings", *_findings(results),
              "", f"Wall time: {elapsed:.0f} s. Settings: `{json.dumps(settings)}`"]
    (out / "report.md").write_text("\n".join(report) + "\n")
    return table
