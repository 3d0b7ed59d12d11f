"""Peak memory and s/step of a few DPO steps of a 1.5 B model (Qwen2.5-1.5B's shapes, random weights), one
recipe at a time, each in its own process.

    python benchmarks/memory_1p5b.py                              # the recipes below, 3 steps each
    python benchmarks/memory_1p5b.py --recipes bf16-lora-ckpt --steps 2
    python benchmarks/memory_1p5b.py --recipes bf16-full-ckpt --max-rss-gb 20   # needs a bigger machine

Every recipe starts from configs/dpo_1p5b_lora.yaml (bf16 weights, LoRA r=16, activation checkpointing,
1 pair per step, max_length 512) and changes one thing. The data are pairs whose prompt is 200 tokens and
whose responses fill max_length (so a shared-prompt row is 200 + 2 x 312 = 824 tokens). Peak RSS is the
child's high-water mark (`wait4`), so it includes loading; a guard polls the child's RSS and kills it past
`--max-rss-gb` (the machine is shared). s/step is the median of the steps after the first (warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dpo_1p5b_lora.yaml"
PROMPT_TOKENS, N_PAIRS = 200, 16
RECIPES = {
    "bf16-lora-ckpt": [],  # the documented recipe
    "bf16-lora": ["train.gradient_checkpointing=false"],
    "fp32-lora-ckpt": ["model.dtype=float32"],
    "bf16-lora-ckpt-batch2": ["train.batch_size=2"],
    # full weights: bf16 weights + grads + AdamW states (~12.4 GB before activations); not run by default
    "bf16-full-ckpt": ["model.lora=null"],
}
DEFAULT_RECIPES = ("bf16-lora-ckpt", "bf16-lora", "fp32-lora-ckpt", "bf16-lora-ckpt-batch2")


def build(root: Path) -> tuple[Path, Path]:
    """The synthetic model (once) and a pairs file of long examples."""
    from distalign.models.tiny import default_corpus, make_shaped
    from transformers import AutoTokenizer
    model = root / "synthetic-qwen2.5-1.5b"
    if not (model / "config.json").is_file():
        make_shaped(model, "qwen2.5-1.5b")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    lines = default_corpus(4000, seed=1)
    text = " ".join(lines)
    ids = tokenizer(text)["input_ids"]
    data = root / "long_pairs.jsonl"
    with data.open("w") as f:
        for i in range(N_PAIRS):
            at = i * 1000
            prompt = tokenizer.decode(ids[at:at + PROMPT_TOKENS])
            chosen, rejected = (tokenizer.decode(ids[at + k:at + k + 400]) for k in (PROMPT_TOKENS, 600))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return model, data


def child(overrides: list[str], steps: int) -> None:
    """Build the trainer from the config and time `steps` optimizer steps; print one JSON line."""
    from distalign.config import OfflineConfig, load_config
    from distalign.training.offline import OfflineTrainer
    start = time.perf_counter()
    trainer = OfflineTrainer(load_config(OfflineConfig, CONFIG, overrides), log=lambda *_: None)
    setup = time.perf_counter() - start
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        sums, _ = trainer.train_step(step)
        times.append(time.perf_counter() - t0)
        losses.append(float(sums["loss"]) / trainer.batches.per_process)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps({"setup_s": setup, "step_s": times, "loss": losses, "parameters": total,
                      "trainable": trainable}), flush=True)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(recipe: str, model: Path, data: Path, out: Path, steps: int, max_rss_gb: float) -> dict:
    overrides = [f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={out / recipe}",
                 "train.gradient_accumulation_steps=1", "train.progress_bar=false", *RECIPES[recipe]]
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(steps), *overrides],
                            stdout=subprocess.PIPE, text=True)
    killed = False
    while True:  # wait4 (not Popen.poll) reaps the child, so its rusage (peak RSS) is ours to read
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            if not killed and rss_bytes(proc.pid) > max_rss_gb * 2**30:
                proc.kill()
                killed = True
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.2)
    output = proc.stdout.read().strip().splitlines()
    row = {"recipe": recipe, "overrides": RECIPES[recipe], "peak_rss_gb": usage.ru_maxrss * 1024 / 2**30,
           "killed_over_gb": max_rss_gb if killed else None}
    if output and not killed:
        row.update(json.loads(output[-1]))
        row["s_per_step"] = statistics.median(row["step_s"][1:] or row["step_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--root", default=str(ROOT / "runs" / "memory_1p5b"), help="model, data and run folders")
    parser.add_argument("--max-rss-gb", type=float, default=10.0, help="kill a recipe's process above this RSS")
    parser.add_argument("--json-out", help="append one JSON object per recipe to this file")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child[1:], int(args.child[0]))
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model, data = build(root)
    print(f"load average at start: {os.getloadavg()}")
    for recipe in args.recipes:
        row = run(recipe, model, data, root, args.steps, args.max_rss_gb)
        print(json.dumps(row), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
