"""`distalign demo`: the README's first command. The quick run end to end, and determinism."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from distalign.demo import DemoSettings, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_table_plot_and_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distalign", "demo", "--quick", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| model | win-rate vs SFT (oracle)" in out.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    for name in ("sft", "dpo", "cpo", "pmle", "online_distill", "rebel", "ppo", "reverse_kl", "grpo", "pi* (target)"):
        row = results[name]
        assert 0.0 <= row["win_rate_vs_sft"] <= 1.0 and row["kl_target_to_policy"] >= 0.0
    assert results["sft"]["kl_to_sft"] == 0.0 and results["pi* (target)"]["kl_target_to_policy"] == 0.0
    assert (tmp_path / "demo" / "winrate_vs_kl.png").stat().st_size > 10_000
    assert "## Findings" in (tmp_path / "demo" / "report.md").read_text()


def test_demo_is_deterministic_for_a_seed(tmp_path):
    tiny = replace(DemoSettings.quick(seed=3), methods=("dpo", "grpo"), sft_steps=10, pair_steps=4,
                   reward_steps=4, online_steps=2, eval_samples_per_prompt=8)
    first = run_demo(tmp_path / "a", settings=tiny, log=lambda *a: None)["results"]
    second = run_demo(tmp_path / "b", settings=tiny, log=lambda *a: None)["results"]
    assert first == second
