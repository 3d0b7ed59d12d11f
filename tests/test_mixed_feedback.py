"""The tutorial §VI mixed-feedback comparison as one command: quick mode trains all six methods from one SFT
start through the library's trainers and writes results.json / table.md / a PNG with exact metrics."""
import json
import math

from distalign.config.testbed import MIXED_FEEDBACK_METHODS
from distalign.testbed.experiments import EXPERIMENTS, run_experiment


def test_mixed_feedback_quick_writes_exact_metrics_for_every_method(tmp_path):
    assert "mixed-feedback" in EXPERIMENTS
    payload = run_experiment("mixed-feedback", tmp_path, quick=True, seed=0)
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "table.md", "kl_tradeoff.png"}
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert set(results) == {"sft", *MIXED_FEEDBACK_METHODS}
    start = results["sft"]
    # the start's KL to itself is estimated on its own samples with identical log-probs: exactly 0
    assert start["kl_to_sft"] == 0.0
    for name, r in results.items():
        assert 0.0 < r["kl_target"] < 10 and 0.9 < r["support_mass"] <= 1.0 + 1e-9, (name, r)
        assert 0.0 <= r["win_rate_vs_sft"] <= 1.0 and math.isfinite(r["kl_to_sft"])
    # every trained method moved away from the start (its samples' log-probs differ from the start's)
    assert all(results[m]["kl_to_sft"] != 0.0 for m in MIXED_FEEDBACK_METHODS)
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m} |" in table for m in MIXED_FEEDBACK_METHODS) and len(payload["verdict"]) == len(MIXED_FEEDBACK_METHODS)


def test_the_comparison_runs_from_one_config_file_with_overrides(tmp_path):
    """`distalign testbed mixed-feedback --config F key=value`: methods, beta and step counts come from the
    file; only the listed methods are trained."""
    import subprocess
    import sys
    from pathlib import Path
    config = Path(__file__).parent.parent / "configs" / "mixed_feedback.yaml"
    out = tmp_path / "mf"
    proc = subprocess.run([sys.executable, "-m", "distalign", "testbed", "mixed-feedback", "--config", str(config),
                           "--out", str(out), "methods=[dpo]", "beta=0.5", "sft_steps=20", "offline_steps=5",
                           "n_pairs=200", "n_demos=64", "n_eval=64"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"sft", "dpo"} and saved["beta"] == 0.5
    assert saved["plan"]["offline_steps"] == 5 and saved["plan"]["iterations"] == 2 and saved["quick"] is True


def test_config_errors_name_the_field(tmp_path):
    import pytest
    from distalign.config import ConfigError, load_config
    from distalign.config.testbed import MixedFeedbackConfig
    with pytest.raises(ConfigError, match="methods"):
        load_config(MixedFeedbackConfig, None, ["methods=[dpo, ppo]"])
    with pytest.raises(ConfigError, match="offline_steps"):
        load_config(MixedFeedbackConfig, None, ["offline_steps=0"])
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(MixedFeedbackConfig, None, ["lerning_rate=1"])
