"""distalign GRPO and RLOO against TRL's GRPOTrainer and RLOOTrainer on the same tiny Llama, in one run.

    python benchmarks/online.py                       # 2 warm-up + 10 timed steps per side, one round
    python benchmarks/online.py --steps 20 --rounds 2

Setup (issue #5 §6): tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 1024), fp32,
8 prompts x 4 completions per step, exactly 32 new tokens (EOS suppressed by `min_new_tokens` on both
sides, so both generate the same number of tokens), temperature 1.0, top-k / top-p off, KL 0.05 to the
initial policy (reference model loaded on both sides), one optimizer step per rollout (TRL
`num_iterations=1`; distalign `update_epochs=1, num_minibatches=1`), same learning rate, constant
schedule, grad clipping 1.0, no gradient checkpointing, no evaluation, no checkpoints while timing.
Both sides score completions with the same deterministic Python reward, `vowel_fraction`.

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


def vowel_fraction(prompts, completions, **_) -> list[float]:
    """The shared reward: the fraction of a completion's characters that are vowels (deterministic)."""
    return [sum(ch in "aeiou" for ch in s) / max(1, len(s)) for s in completions]


def build_world(root: Path, n_prompts: int, seed: int = 0) -> dict:
    """The tiny Llama and a JSONL of prompts of 16-32 random words (about 20-40 tokens)."""
    from transformers import AutoTokenizer

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
def run_distalign(method: str, model: str, data: str, warmup: int, steps: int, out: str) -> dict:
    import torch

    from distalign.config import load_config
    from distalign.config.online import OnlineConfig
    from distalign.training import online, value_head
    cfg = load_config(OnlineConfig, None, [
        f"method={method}", f"model.name_or_path={model}", f"data.train={data}", "data.max_prompt_length=64",
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
    return {"peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- TRL worker
def run_trl(method: str, model: str, data: str, warmup: int, steps: int, out: str) -> dict:
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
                  report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
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
    report("result", run(method, args.model, args.data, args.warmup, args.steps, args.out))


def run_round(world: dict, warmup: int, steps: int, tmp: Path) -> dict[str, dict]:
    """Every kind in its own process, in lockstep; each result gains its timed steps and phases."""
    commands = {kind: [sys.executable, __file__, "--worker", kind, "--model", world["model"], "--data",
                       world["data"], "--warmup", str(warmup), "--steps", str(steps), "--out",
                       tempfile.mkdtemp(dir=tmp, prefix=kind)] for kind in KINDS}
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
    return {"step_s": step_s, "completions_s": PROMPTS * SAMPLES / step_s,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole lockstep run (fresh processes)")
    parser.add_argument("--worker", choices=KINDS)
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    load = "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # Enough prompts that no worker wraps around an epoch while timing.
        world = build_world(tmp, n_prompts=PROMPTS * (args.warmup + args.steps) * 2)
        for _ in range(args.rounds):
            for kind, run in run_round(world, args.warmup, args.steps, tmp).items():
                runs[kind].append(run)
                print(f"{kind}: median step {statistics.median(run['step_times']):.3f} s", flush=True)
    print(f"\nthreads: {runs['distalign-grpo'][0]['threads']}; {PROMPTS} prompts x {SAMPLES} completions, "
          f"{NEW_TOKENS} new tokens, fp32, {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s)")
    print_tables({kind: summarise(r) for kind, r in runs.items()}, load)


if __name__ == "__main__":
    main()
