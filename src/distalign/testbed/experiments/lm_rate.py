"""`distalign testbed lm-rate`: the rate experiment at the language level, with a real transformer.

    distalign testbed lm-rate --quick --out runs/lm-rate      # about a minute on 2 CPU cores

Seed 001 (Theorems 4/6/7) predicts E KL(pi*||pi_hat_n) = O(1/n) for PMLE when the model class holds
pi*. Here pi* is the synthetic world's exact target (`lm.LMWorld`, 4 words, length <= 3, 4 prompts)
and pi_hat_n is a tiny Llama trained by the normal `OfflineTrainer` on n preference pairs:
a, b ~ pi0(.|x) i.i.d., a chosen with probability sigmoid(gamma (log pi*(a|x) - log pi*(b|x))).

Protocol (fixed before looking at results, not tuned to the slope):
1. SFT the random model on exact pi0 samples once per run; every n and seed starts from that
   model, so what is measured is estimation from a common start, not optimisation from scratch.
2. For each n and data seed: PMLE (gamma = 1, no KL term) and DPO (beta = 1, reference = the SFT start)
   for `EPOCHS` passes (at least `MIN_STEPS` optimiser steps), AdamW at a constant learning rate.
3. Metric: exact E_x KL(pi*(x)||pi_hat(x)) by enumerating all 84 responses of each prompt, and
   KL(pi_inf(x)||pi_hat(x)) to each objective's population minimiser pi_inf (as in the tabular `rate`).
DPO at beta = 1 is a contrast, not a consistent estimator of pi*: its population minimiser solves
log pi(a) - log pi(b) = [log ref(a) - log ref(b)] + [log pi*(a) - log pi*(b)], i.e.
pi_inf ∝ ref * pi* (tutorial seed 002, DPO optimum ref exp(r/beta) with r = gamma log pi*), so its KL
to pi* has a floor KL(pi*||pi_inf) > 0 that we compute exactly and report.
What this does NOT control: the transformer's optimisation error after a fixed budget and its
implicit regularisation toward the start, which dominate at small n; the table says what it shows.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..lm_data import preference_pairs, write_jsonl
from ..plotting import line_plot, loglog_slope, markdown_table, write_results, write_table
from ..tabular_fit import single_thread
from .lm_common import (
    mean_kl,
    reference_kl,
    run_offline,
    sft_start,
    small_world,
    support_logps,
    trained_module,
    world_logps,
)

QUICK = {"ns": (128, 1024), "seeds": 1, "sft_steps": 250, "n_demos": 4096}
FULL = {"ns": (128, 512, 2048, 8192), "seeds": 3, "sft_steps": 600, "n_demos": 8192}
METHODS = {"pmle": {"gamma": 1.0}, "dpo": {"beta": 1.0}}
BATCH, LEARNING_RATE, EPOCHS, MIN_STEPS = 32, 1e-3, 4, 50
SLOPE_BAND = (-1.3, -0.7)      # the band the quick tabular `rate` test accepts as "O(1/n)"


def steps_for(n: int) -> int:
    return max(MIN_STEPS, math.ceil(EPOCHS * n / BATCH))


def dpo_limit_logps(ref_logps: torch.Tensor, target_logps: torch.Tensor) -> torch.Tensor:
    """log pi_inf = log ref + log pi* - log Z(x), normalised over the world's responses (X, M).

    The DPO population minimiser at beta = gamma = 1 on pairs with full support (module docstring)."""
    joint = ref_logps + target_logps
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def fit_and_score(method: str, start: Path, pairs_path: Path, out: Path, n: int, seed: int, world,
                  limits: dict[str, torch.Tensor]) -> dict:
    """One run through the normal trainer; exact KL to pi* and to the method's own limit pi_inf."""
    trainer = run_offline(method, start, pairs_path, out, steps=steps_for(n), batch_size=min(BATCH, n),
                          learning_rate=LEARNING_RATE, seed=seed, loss=METHODS[method])
    policy = support_logps(world, trained_module(trainer), trainer.tokenizer)
    return {"kl_target": mean_kl(limits["pmle"], policy), "kl_limit": mean_kl(limits[method], policy),
            "final_train_loss": trainer_last_loss(out)}


def trainer_last_loss(out: Path) -> float:
    """The last train/loss the trainer logged to out/metrics.jsonl."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]
    return float(losses[-1]) if losses else math.nan


def sweep(world, start: Path, work: Path, plan: dict, base_seed: int,
          limits: dict[str, torch.Tensor]) -> dict:
    """KL per method, n and seed; each (n, seed) has its own pair sample, shared by the methods."""
    ns = plan["ns"]
    keys = ("kl_per_seed", "kl_limit_per_seed", "final_train_loss")
    runs = {m: {k: {n: [] for n in ns} for k in keys} for m in METHODS}
    for n in ns:
        for s in range(plan["seeds"]):
            data_seed = 1000 * base_seed + 10 * s + 1
            pairs_path = work / f"pairs-n{n}-s{s}.jsonl"
            write_jsonl(pairs_path, preference_pairs(world, n, seed=data_seed))
            for method in METHODS:
                result = fit_and_score(method, start, pairs_path, work / f"{method}-n{n}-s{s}", n, data_seed,
                                       world, limits)
                values = (result["kl_target"], result["kl_limit"], result["final_train_loss"])
                for key, value in zip(keys, values):
                    runs[method][key][n].append(value)
            print(f"lm-rate: n={n} seed={s}: " + ", ".join(
                f"{m} KL={runs[m]['kl_per_seed'][n][-1]:.4f}" for m in METHODS), flush=True)
    for r in runs.values():
        r["mean_kl"] = {n: float(np.mean(v)) for n, v in r["kl_per_seed"].items()}
        r["stderr_kl"] = {n: float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
                          for n, v in r["kl_per_seed"].items()}
        r["mean_kl_limit"] = {n: float(np.mean(v)) for n, v in r["kl_limit_per_seed"].items()}
        r["slope"] = loglog_slope(ns, [r["mean_kl"][n] for n in ns])
        r["slope_to_limit"] = loglog_slope(ns, [r["mean_kl_limit"][n] for n in ns])
    return runs


def verdict(runs: dict, ns, start_kl: float, dpo_floor: float) -> list[str]:
    """Plain statements of what the numbers show; "consistent with O(1/n)" needs a slope of KL to the
    method's own limit inside SLOPE_BAND."""
    lines = []
    for method, r in runs.items():
        below_start = all(r["mean_kl"][n] < start_kl for n in ns)
        shown = SLOPE_BAND[0] <= r["slope_to_limit"] <= SLOPE_BAND[1]
        lines.append(f"{method}: slope of KL(pi_inf||pi_hat) {r['slope_to_limit']:.2f}, of KL(pi*||pi_hat) "
                     f"{r['slope']:.2f} over n = {list(ns)}: "
                     f"{'consistent with' if shown else 'does NOT show'} the O(1/n) rate at this scale; "
                     f"KL(pi*||pi_hat) {'below' if below_start else 'NOT below'} the SFT start "
                     f"({start_kl:.4f}) at every n.")
    lines.append(f"DPO (beta = 1) cannot go below its floor KL(pi*||pi_inf) = {dpo_floor:.4f}, "
                 "pi_inf ∝ ref * pi*: it estimates a different distribution.")
    return lines


def write_outputs(out_dir: Path, results: dict) -> None:
    ns, runs = results["ns"], results["runs"]
    rows = [[m, n, len(r["kl_per_seed"][n]), steps_for(n), r["mean_kl"][n], r["stderr_kl"][n],
             n * r["mean_kl"][n], r["mean_kl_limit"][n], n * r["mean_kl_limit"][n]]
            for m, r in runs.items() for n in ns]
    header = ["objective", "n", "seeds", "steps", "mean KL(pi*||pi_hat)", "stderr", "n * KL",
              "mean KL(pi_inf||pi_hat)", "n * KL(pi_inf||pi_hat)"]
    slopes = markdown_table(["objective", "slope of KL(pi*||pi_hat)", "slope of KL(pi_inf||pi_hat)"],
                            [[m, r["slope"], r["slope_to_limit"]] for m, r in runs.items()])
    reference = markdown_table(["model", "KL(pi*||model)"], [
        ["pi0 (exact reference)", results["kl_target_to_pi0"]],
        ["SFT start (tiny Llama fitted to pi0)", results["kl_target_to_start"]],
        ["DPO population limit pi_inf ∝ start * pi*", results["kl_target_to_dpo_limit"]]])
    write_table(out_dir, [
        (f"Exact KL after training through OfflineTrainer ({results['seconds']:.0f} s); "
         "pi_inf = pi* for PMLE, ∝ start * pi* for DPO", markdown_table(header, rows)),
        ("Log-log slopes against n (O(1/n) predicts -1 for KL to pi_inf)", slopes),
        ("Reference points", reference),
        ("What the data shows", "\n".join(f"- {line}" for line in results["verdict"]))])
    series = {m: (list(ns), [r["mean_kl"][n] for n in ns]) for m, r in runs.items()}
    series["SFT start"] = (list(ns), [results["kl_target_to_start"]] * len(ns))
    series["dpo: KL to its own limit"] = (list(ns), [runs["dpo"]["mean_kl_limit"][n] for n in ns])
    line_plot(out_dir / "lm_rate.png", series, "number of preference pairs n", "exact KL",
              "Language-level rate (tiny Llama, OfflineTrainer)", loglog=True)
    line_plot(out_dir / "lm_rate_nkl.png",
              {m: (list(ns), [n * r["mean_kl_limit"][n] for n in ns]) for m, r in runs.items()},
              "number of preference pairs n", "n * KL(pi_inf||pi_hat)", "n * KL (flat under O(1/n))",
              loglog=True)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    plan = QUICK if quick else FULL
    began = time.perf_counter()
    world = small_world(seed)
    target_logps = world_logps(world)
    # tiny tensors: one thread avoids the synchronisation that makes 2 threads ~10x slower on a busy machine
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]), single_thread():
        work = Path(tmp)
        start, start_logps = sft_start(world, work, plan, seed)
        limits = {"pmle": target_logps, "dpo": dpo_limit_logps(start_logps, target_logps)}
        runs = sweep(world, start, work, plan, seed, limits)
    start_kl = mean_kl(target_logps, start_logps)
    protocol = {"world": world.to_dict(), "objectives": METHODS, "batch_size": BATCH,
                "learning_rate": LEARNING_RATE, "epochs": EPOCHS, "min_steps": MIN_STEPS,
                "schedule": "constant", "optimizer": "AdamW", "sft_steps": plan["sft_steps"],
                "sft_demos": plan["n_demos"], "pair_sampler": "reference (pi0)", "gamma": world.gamma,
                "metric": "exact KL by enumeration of all responses",
                "model": "tiny Llama (hidden 32, 2 layers, word-level tokenizer)"}
    results = {"ns": list(plan["ns"]), "seeds": plan["seeds"], "quick": quick, "seed": seed, "runs": runs,
               "kl_target_to_pi0": reference_kl(world), "kl_target_to_start": start_kl,
               "kl_target_to_dpo_limit": mean_kl(target_logps, limits["dpo"]), "protocol": protocol}
    results["verdict"] = verdict(runs, plan["ns"], start_kl, results["kl_target_to_dpo_limit"])
    results["seconds"] = time.perf_counter() - began
    write_outputs(out_dir, results)
    write_results(out_dir, results)
    print(f"lm-rate: {results['seconds']:.1f} s; " + " ".join(results["verdict"]))
    return results
