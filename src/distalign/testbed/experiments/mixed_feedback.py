"""`distalign testbed mixed-feedback`: the tutorial's §VI comparison (seed 002, "Aligning with both
demonstrations and pairwise comparisons") on the synthetic-language world, with exact scoring.

    distalign testbed mixed-feedback --quick --out runs/mixed-feedback     # about a minute on 2 CPU cores

Data: demonstrations y ~ pi*(.|x) and preference pairs a, b ~ pi0 labelled by
P(a > b) = sigmoid(gamma (log pi*(a) - log pi*(b))) (seed 001 Eq. 2). One tiny Llama is SFT-ed on pi0
samples once; every method starts from that model and trains through the library's own trainers:
DPO and IPO (pairs only, `OfflineTrainer`), RPO with demonstrations, SPAC and SPIN (`train_iterative`),
and AIHF (`train_irl`: reward from demonstrations > own samples + alpha * Bradley-Terry on the pairs,
then RLOO on it). Metrics of each final policy:
- exact E_x KL(pi*||pi) by enumerating the world's 84 responses per prompt (pi* is the truth here);
- mass on the world's support: sum over those responses of pi(y|x); the rest is invalid text;
- oracle win-rate against the SFT start: mean P*(y > y_sft), y and y_sft sampled (invalid text loses);
- KL(pi||pi_sft) by Monte Carlo on the policy's own samples (both log-probs of the sampled tokens).
One seed per run and no tuning per method (a shared beta = 1, the world's gamma): read differences
smaller than a few hundredths of KL as noise.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from distalign.config import load_config
from distalign.config.irl import IRLConfig
from distalign.config.online import GenerationConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.config.testbed import MixedFeedbackConfig
from distalign.models import load_policy, load_tokenizer
from distalign.training.irl import train_irl
from distalign.training.iterative import train_iterative
from distalign.training.rollout import response_forward
from distalign.training.sampling import build_sampler

from ..lm_data import demonstrations, oracle_win_rate, preference_pairs, write_jsonl
from ..plotting import line_plot, markdown_table, write_results, write_table
from ..tabular_fit import single_thread
from .lm_common import (
    make_world_model,
    mean_kl,
    quiet,
    run_offline,
    sft_to_reference,
    small_world,
    support_logps,
    world_logps,
)

QUICK = {"sft_steps": 150, "n_pairs": 2000, "n_demos": 512, "offline_steps": 60, "iterative_steps": 30,
         "iterations": 2, "aihf_iterations": 1, "rl_steps": 30, "reward_steps": 40, "n_eval": 512}
FULL = {"sft_steps": 400, "n_pairs": 8000, "n_demos": 2048, "offline_steps": 250, "iterative_steps": 60,
        "iterations": 3, "aihf_iterations": 2, "rl_steps": 60, "reward_steps": 80, "n_eval": 2048}
LENGTHS = ["data.max_prompt_length=16", "data.max_length=32"]


def train_offline_pairs(method: str, start: Path, files: dict, out: Path, plan: dict, seed: int) -> Path:
    run_offline(method, start, files["pairs"], out, steps=plan["offline_steps"], batch_size=32,
                learning_rate=plan["learning_rate"], seed=seed, loss={"beta": plan["beta"]})
    return out / "final"


def train_iterative_method(method: str, start: Path, files: dict, out: Path, plan: dict, seed: int) -> Path:
    # Each method gets only the fields it reads (the config refuses the others).
    pairs = [f"pairs={files['pairs']}", "loss.alpha=1.0"] if method != "spin" else []
    sampling = ["generation.max_new_tokens=4", "generation.temperature=1.0"] if method != "rpo_demos" else []
    cfg = load_config(OnlinePairwiseConfig, None, [
        f"method={method}", f"model.name_or_path={start}", *pairs, *sampling,
        f"demonstrations={files['demos']}", f"train.output_dir={out}", "train.overwrite=true", f"train.seed={seed}",
        "train.batch_size=32", "train.progress_bar=false", f"optim.learning_rate={plan['learning_rate']}",
        "optim.schedule=constant", f"loss.beta={plan['beta']}",
        f"iteration.iterations={1 if method == 'rpo_demos' else plan['iterations']}",
        f"iteration.steps_per_iteration={plan['iterative_steps']}", *LENGTHS])
    return Path(train_iterative(cfg, log=lambda *_: None)["final_model"])


def train_aihf(method: str, start: Path, files: dict, out: Path, plan: dict, seed: int) -> Path:
    cfg = load_config(IRLConfig, None, [
        "method=aihf", f"model.name_or_path={start}", f"demonstrations={files['demos']}", f"pairs={files['pairs']}",
        f"train.output_dir={out}", "train.overwrite=true", f"train.seed={seed}", f"iterations={plan['aihf_iterations']}",
        "generation.max_new_tokens=4", "generation.temperature=1.0", "generation.num_samples=4",
        f"reward.steps={plan['reward_steps']}", "reward.batch_size=32", "reward.learning_rate=3e-3",
        "reward.alpha=1.0", "rl.method=rloo", f"rl.steps={plan['rl_steps']}", "rl.batch_size=16",
        "rl.optim.learning_rate=2e-3", "rl.optim.schedule=constant", f"rl.loss.kl_coef={plan['beta']}", *LENGTHS])
    return Path(train_irl(cfg, log=lambda *_: None)["final_model"])


TRAINERS = {"dpo": train_offline_pairs, "ipo": train_offline_pairs, "rpo_demos": train_iterative_method,
            "spac": train_iterative_method, "spin": train_iterative_method, "aihf": train_aihf}


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int):
    """Temperature-1 samples of `model` (the SampledBatch for exact log-probs, and the decoded texts)."""
    torch.manual_seed(seed)
    sampler = build_sampler(tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0), "")
    batch = sampler.sample(model, [tokenizer(p)["input_ids"] for p in prompts])
    lengths = batch.response_mask.sum(-1).long().tolist()
    texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(batch.response_ids.tolist(), lengths)],
                                   skip_special_tokens=True)
    return batch, texts


@torch.no_grad()
def evaluate(world, model, sft, tokenizer, prompts: list[str], sft_texts: list[str], seed: int) -> dict:
    """Exact KL(pi*||pi) and support mass; sampled win-rate vs the SFT start and KL(pi||pi_sft)."""
    model.eval()
    table = support_logps(world, model, tokenizer)
    batch, texts = sample_texts(model, tokenizer, prompts, world.max_len + 1, seed)
    log_ratio = (response_forward(model, batch).token_logps.sum(-1)
                 - response_forward(sft, batch).token_logps.sum(-1)).double()
    win, win_se = oracle_win_rate(world, prompts, texts, sft_texts)
    invalid = torch.isinf(world.logprob(prompts, texts)).double().mean()
    return {"kl_target": mean_kl(world_logps(world), table), "support_mass": float(table.exp().sum(-1).mean()),
            "win_rate_vs_sft": win, "win_rate_se": win_se, "kl_to_sft": float(log_ratio.mean()),
            "kl_to_sft_se": float(log_ratio.std() / math.sqrt(len(log_ratio))),
            "invalid_sample_fraction": float(invalid)}


def verdict(results: dict) -> list[str]:
    """Plain statements: which methods moved toward pi* (exact KL down by > 0.02) and which leaked mass."""
    start = results["sft"]
    lines = []
    for method in (m for m in results if m != "sft"):
        r = results[method]
        change = r["kl_target"] - start["kl_target"]
        direction = "closer to pi*" if change < -0.02 else ("further from pi*" if change > 0.02 else "no clear change")
        lines.append(f"{method}: KL(pi*||pi) {r['kl_target']:.3f} ({change:+.3f} vs the SFT start: {direction}); "
                     f"win-rate vs SFT {r['win_rate_vs_sft']:.3f} +- {r['win_rate_se']:.3f}; "
                     f"mass off the world's support {1 - r['support_mass']:.3f} (SFT {1 - start['support_mass']:.3f})")
    return lines


def run(out_dir: Path, quick: bool = False, seed: int = 0, config: MixedFeedbackConfig | None = None) -> dict:
    """Build the world and data, SFT once, train the methods from that start, score, write files.
    `config` (a `distalign testbed mixed-feedback --config` file) replaces quick / seed and overrides the plan."""
    config = config or MixedFeedbackConfig(quick=quick, seed=seed)
    quick, seed = config.quick, config.seed
    plan = {**(QUICK if quick else FULL), **config.plan_overrides(), "beta": config.beta,
            "learning_rate": config.learning_rate}
    out, begin = Path(out_dir), time.perf_counter()
    work = out / "work"
    world = small_world(seed)
    files = {"pairs": work / "pairs.jsonl", "demos": work / "demonstrations.jsonl"}
    write_jsonl(files["pairs"], preference_pairs(world, plan["n_pairs"], seed=1000 * seed + 1))
    write_jsonl(files["demos"], demonstrations(world, plan["n_demos"], seed=1000 * seed + 2))
    results, timings = {}, {}
    with single_thread(), quiet():
        init = make_world_model(world, work / "init", seed=seed)
        start = sft_to_reference(world, init, work / "sft", n_demos=2048, steps=plan["sft_steps"], seed=seed)
        tokenizer = load_tokenizer(str(start))
        sft = load_policy(str(start)).eval()
        prompts = [world.prompts[i % len(world.prompts)] for i in range(plan["n_eval"])]
        _, sft_texts = sample_texts(sft, tokenizer, prompts, world.max_len + 1, seed + 1)
        results["sft"] = evaluate(world, sft, sft, tokenizer, prompts, sft_texts, seed + 2)
        for method in config.methods:
            tick = time.perf_counter()
            final = TRAINERS[method](method, start, files, work / method, plan, seed)
            results[method] = evaluate(world, load_policy(str(final)), sft, tokenizer, prompts, sft_texts, seed + 2)
            timings[method] = time.perf_counter() - tick
    lines = verdict(results)
    payload = {"quick": quick, "seed": seed, "plan": plan, "beta": plan["beta"], "results": results,
               "train_seconds": timings, "verdict": lines, "seconds": time.perf_counter() - begin}
    write_results(out, payload)
    header = ["method", "KL(pi*||pi) exact", "mass on support", "win-rate vs SFT", "+- se", "KL(pi||SFT)", "+- se"]
    rows = [[name, r["kl_target"], r["support_mass"], r["win_rate_vs_sft"], r["win_rate_se"], r["kl_to_sft"],
             r["kl_to_sft_se"]] for name, r in results.items()]
    write_table(out, [("Mixed demonstrations + preferences (tutorial §VI) on the language testbed",
                       markdown_table(header, rows)), ("What the numbers say", "\n".join(f"- {s}" for s in lines))])
    line_plot(out / "kl_tradeoff.png", {name: ([r["kl_to_sft"]], [r["kl_target"]]) for name, r in results.items()},
              "KL(pi || SFT start), Monte Carlo", "KL(pi* || pi), exact", "mixed feedback: distance moved vs error",
              hline=results["sft"]["kl_target"])
    print("\n".join(lines))
    return payload
