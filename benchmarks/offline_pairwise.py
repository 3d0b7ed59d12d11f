"""distalign DPO against TRL's DPOTrainer on the same tiny models and data, in one run.

    python benchmarks/offline_pairwise.py                 # tiny + medium Llama, 30 timed steps each
    python benchmarks/offline_pairwise.py --sizes tiny --steps 10
    python benchmarks/offline_pairwise.py --sizes tiny --rounds 3    # medians over 3 alternations

Each side runs in its own subprocess (so peak RSS is its own); the sides take turns step by step
(`lockstep.py`: the machine's drift over minutes lands on every side alike), and the script prints pairs/s, unique tokens/s, peak RSS, the ratios, and useful FLOP/s against the matmul peak
measured in the same run (PERFORMANCE.md: "useful" = unique unpadded tokens x (6N policy
forward+backward + 2N reference forward), N = non-embedding parameters).
Setup (issue #3 §7): batch 8 pairs, max length 128, fp32, reference model on, 2,000 synthetic pairs
with ~64-token prompts and ~48-token responses.
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
BATCH, MAX_LENGTH, LR = 8, 128, 1e-6
# distalign: defaults; -precomputed: reference log-probs computed once before training (cost charged
# below); -grouped: defaults plus group_by_length (batches of similar length, less padding).
KINDS = ("trl", "distalign", "distalign-precomputed", "distalign-grouped")


def build_world(root: Path, sizes: list[str], n_pairs: int, seed: int = 0) -> dict:
    """Tiny Llama folders sharing one tokenizer, and a JSONL of synthetic pairs."""
    from distalign.models.tiny import make_tiny
    from transformers import AutoTokenizer
    paths = {}
    for name in sizes:
        paths[name] = str(make_tiny(root / name, arch="llama", vocab_size=1024, seed=seed,
                                    max_position_embeddings=256, **SIZES[name]))
    tokenizer = AutoTokenizer.from_pretrained(paths[sizes[0]])
    words = [t for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2]
    words = [tokenizer.convert_tokens_to_string([w]) for w in sorted(words)]
    rng = random.Random(seed)
    text = lambda lo, hi: "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).strip()
    data = root / "pairs.jsonl"
    with open(data, "w") as f:
        for _ in range(n_pairs):
            f.write(json.dumps({"prompt": text(56, 72), "chosen": text(40, 56), "rejected": text(40, 56)}) + "\n")
    return {"models": paths, "data": str(data)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def non_embedding_params(model) -> int:
    embed = {id(p) for m in model.modules() if m.__class__.__name__ == "Embedding" for p in m.parameters()}
    head = model.get_output_embeddings()
    embed |= {id(p) for p in head.parameters()} if head is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in embed)


def run_distalign(model: str, data: str, warmup: int, steps: int, out: str, precompute: bool,
                  group_by_length: bool = False) -> dict:
    import torch
    from distalign.config import load_config, OfflineConfig
    from distalign.training.common import record_length
    from distalign.training.offline import OfflineTrainer
    cfg = load_config(OfflineConfig, None, [
        "method=dpo", f"model.name_or_path={model}", f"data.train={data}", f"data.max_length={MAX_LENGTH}",
        "data.max_prompt_length=96", f"train.batch_size={BATCH}", f"train.max_steps={warmup + steps}",
        f"train.output_dir={out}", f"optim.learning_rate={LR}", "train.progress_bar=false",
        f"group_by_length={group_by_length}"])
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
            "non_embedding_params": non_embedding_params(model_obj), "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def run_trl(model: str, data: str, warmup: int, steps: int, out: str) -> dict:
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
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     learning_rate=LR, max_steps=warmup + steps, logging_steps=10_000, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, beta=0.1,
                     disable_dropout=True)
    timer = Timer()
    trainer = DPOTrainer(model=policy, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"peak_rss_mb": peak_rss_mb()}


def matmul_peak_gflops(repeats: int = 20) -> float:
    import torch
    a, b = torch.randn(2000, 256), torch.randn(256, 688)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2000 * 256 * 688 / best / 1e9


def worker(args) -> None:
    if args.worker == "trl":
        result = run_trl(args.model, args.data, args.warmup, args.steps, args.out)
    else:
        result = run_distalign(args.model, args.data, args.warmup, args.steps, args.out,
                               args.worker == "distalign-precomputed", args.worker == "distalign-grouped")
    report("result", result)


def run_round(model: str, data: str, warmup: int, steps: int, tmp: Path) -> dict[str, dict]:
    """Every kind in its own process, in lockstep; each result gains its timed `step_times`."""
    commands = {kind: [sys.executable, __file__, "--worker", kind, "--model", model, "--data", data,
                       "--warmup", str(warmup), "--steps", str(steps), "--out", tempfile.mkdtemp(dir=tmp)]
                for kind in KINDS}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               DISTALIGN_CACHE=tempfile.mkdtemp(dir=tmp))  # never a warm cache
    runs = run_lockstep(commands, warmup + steps, env)
    return {kind: {**run["result"], "step_times": [s["seconds"] for s in run["steps"][warmup:]]}
            for kind, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole lockstep run (fresh processes)")
    parser.add_argument("--worker", choices=KINDS)
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sizes = args.sizes.split(",")
    load = "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())  # as benchmarks/online.py
    peak = matmul_peak_gflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        world = build_world(tmp, sizes, args.pairs)
        for size in sizes:
            runs = {kind: [] for kind in KINDS}
            for _ in range(args.rounds):
                for kind, run in run_round(world["models"][size], world["data"], args.warmup, args.steps,
                                           tmp).items():
                    runs[kind].append(run)
            base = runs["distalign"][0]
            tokens, n = base["tokens_per_pair"], base["non_embedding_params"]
            # Seconds per pair of each run: median step / batch, plus the precompute spread over one epoch.
            per_pair = {kind: statistics.median(statistics.median(r["step_times"]) / BATCH
                                                + r.get("precompute_s", 0.0) / r.get("n_pairs", 1) for r in rs)
                        for kind, rs in runs.items()}
            rss = {kind: max(r["peak_rss_mb"] for r in rs) for kind, rs in runs.items()}
            for kind in KINDS:
                pairs_s = 1.0 / per_pair[kind]
                precompute = statistics.median(r.get("precompute_s", 0.0) for r in runs[kind])
                rows.append((size, kind, pairs_s, pairs_s * tokens, rss[kind], per_pair["trl"] / per_pair[kind],
                             rss[kind] / rss["trl"], pairs_s * tokens * 8 * n / 1e9 / peak, precompute))
    print(f"\nmatmul peak (2000x256 @ 256x688, fp32): {peak:.1f} GFLOP/s; threads: {base['threads']}; "
          f"{args.rounds} round(s), medians; load at start: {load}")
    print("| size | implementation | pairs/s | unique tokens/s | peak RSS MB | pairs/s vs TRL | RSS vs TRL "
          "| useful FLOP/s / peak | reference precompute s (charged over 1 epoch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, kind, pairs_s, tok_s, rss, ratio, rss_ratio, util, precompute in rows:
        print(f"| {size} | {kind} | {pairs_s:.2f} | {tok_s:.0f} | {rss:.0f} | {ratio:.2f}x | {rss_ratio:.2f}x "
              f"| {util:.0%} | {precompute:.1f} |")


if __name__ == "__main__":
    main()
