"""The tutorial §VI mixed-feedback comparison as one command: quick mode trains all six methods from one SFT
start through the library's trainers and writes results.json / table.md / a PNG with exact metrics."""
import json
import math

from distalign.testbed.experiments import EXPERIMENTS, run_experiment
from distalign.testbed.experiments.mixed_feedback import METHODS


def test_mixed_feedback_quick_writes_exact_metrics_for_every_method(tmp_path):
    assert "mixed-feedback" in EXPERIMENTS
    payload = run_experiment("mixed-feedback", tmp_path, quick=True, seed=0)
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "table.md", "kl_tradeoff.png"}
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert set(results) == {"sft", *METHODS}
    start = results["sft"]
    # the start's KL to itself is estimated on its own samples with identical log-probs: exactly 0
    assert start["kl_to_sft"] == 0.0
    for name, r in results.items():
        assert 0.0 < r["kl_target"] < 10 and 0.9 < r["support_mass"] <= 1.0 + 1e-9, (name, r)
        assert 0.0 <= r["win_rate_vs_sft"] <= 1.0 and math.isfinite(r["kl_to_sft"])
    # every trained method moved away from the start (its samples' log-probs differ from the start's)
    assert all(results[m]["kl_to_sft"] != 0.0 for m in METHODS)
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and len(payload["verdict"]) == len(METHODS)
