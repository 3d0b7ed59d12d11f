"""Language part of `distalign testbed undesirable-space`: a tiny Llama trained by the normal
`OfflineTrainer` on pairs whose reference strongly prefers the rejected response (seed 003).

    run_lm(Path("runs/us/lm"), quick=True)     # about 30 s on 2 CPU cores; called by undesirable_space.run

Setup. The world of `lm_common.small_world`; the start (and DPO / CPO reference) is the tiny Llama
SFT'd on exact pi0 samples. For each prompt we pick same-length pairs (y+, y-) that the target
prefers, delta* = log pi*(y+|x) - log pi*(y-|x) >= MIN_TARGET_GAP, while the reference strongly
prefers y-: delta_ref = log ref(y+|x) - log ref(y-|x) << 0. Each pair is written R times with labels
in the proportion the target implies, k = round(R sigmoid(gamma delta*)) rows "y+ > y-" and R - k rows
"y- > y+", so every objective's empirical loss is p_hat loss(y+, y-) + (1 - p_hat) loss(y-, y+).
Stationary points in delta_pi = log pi(y+|x) - log pi(y-|x), as in the tabular part (beta = gamma = 1):
- DPO:  delta_pi = delta_ref + logit(p_hat), negative when delta_ref < -logit(p_hat): the loss falls
  below log 2 while the policy still prefers y-, a point of U = {delta_pi < 0, delta_pi > delta_ref}.
- PMLE: delta_pi = logit(p_hat) > 0; CPO full / simple / clip: delta_pi > 0 (margin-shifted for
  full / simple, a little lower for clip because the reversed rows' term has max(-delta_ref, 0) > 0).
  CPO works on length-normalised deltas (divided by the response tokens, EOS included: 4 for the
  3-word pairs here), so its stationary delta_pi is about 4x the one in the normalised units.
Pairs are chosen by ranking DPO's stationary point (most negative first), a rule fixed in advance.
The policy is a shared transformer, not a table, so the pairs interact; we record what happens.
Each method's trainer is stepped with `train_step` (the loop `train()` runs) and, every
`eval_every` steps, the policy is scored exactly on the distinct pairs: delta_pi, the fraction in U,
and the empirical DPO loss of the iterate.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from distalign.objectives import dpo_loss, frac_in_undesirable

from ..lm import all_sequences
from ..lm_data import write_jsonl
from ..lm_policy import hf_policy_logprob_fn
from ..plotting import line_plot, markdown_table, write_results, write_table
from ..tabular_fit import single_thread
from .lm_common import (
    run_offline,
    sft_start,
    small_world,
    trained_module,
    world_logps,
)

BETA, MARGIN, LEARNING_RATE, BATCH = 1.0, 0.5, 3e-3, 16
MIN_TARGET_GAP, ROWS_PER_PAIR = 0.5, 16
METHODS = {"dpo": ("dpo", {"beta": BETA}),
           "cpo_full": ("cpo", {"beta": BETA, "margin": MARGIN, "variant": "full"}),
           "cpo_simple": ("cpo", {"beta": BETA, "margin": MARGIN, "variant": "simple"}),
           "cpo_clip": ("cpo", {"beta": BETA, "variant": "clip"}),  # clip has no margin (refused)
           "pmle": ("pmle", {"gamma": 1.0})}
QUICK = {"steps": 60, "eval_every": 5, "sft_steps": 250, "n_demos": 4096, "pairs_per_prompt": 2}
FULL = {"steps": 300, "eval_every": 10, "sft_steps": 600, "n_demos": 8192, "pairs_per_prompt": 3}


def select_pairs(world, target_logps: torch.Tensor, ref_logps: torch.Tensor, per_prompt: int) -> list[dict]:
    """Per prompt, the `per_prompt` same-length pairs with delta* >= MIN_TARGET_GAP whose DPO stationary
    point delta_ref + logit(p_hat) is most negative, no response used twice within a prompt.

    target_logps / ref_logps: (X, M) over `all_sequences` (pi* exact, the reference model's log-probs)."""
    tokens = all_sequences(len(world.words), world.max_len)
    lengths = (tokens != len(world.words)).sum(1)
    same_length = lengths[:, None] == lengths[None, :]
    texts = world.decode(tokens)
    pairs = []
    for x, prompt in enumerate(world.prompts):
        delta_target = target_logps[x, :, None] - target_logps[x, None, :]      # (M, M): [i, j] = i over j
        delta_ref = ref_logps[x, :, None] - ref_logps[x, None, :]
        p_hat = label_share(torch.sigmoid(world.gamma * delta_target))
        depth = delta_ref + torch.logit(p_hat)
        allowed = same_length & (delta_target >= MIN_TARGET_GAP)
        order = torch.argsort(torch.where(allowed, depth, torch.full_like(depth, math.inf)).flatten())
        used: set[int] = set()
        for flat in order.tolist():
            i, j = divmod(flat, len(texts))
            if not allowed[i, j] or sum(p["prompt"] == prompt for p in pairs) == per_prompt:
                break
            if i in used or j in used:
                continue
            used.update((i, j))
            pairs.append({"prompt": prompt, "chosen": texts[i], "rejected": texts[j],
                          "delta_target": float(delta_target[i, j]), "delta_ref": float(delta_ref[i, j]),
                          "p_hat": float(p_hat[i, j]), "dpo_stationary_delta_pi": float(depth[i, j])})
    return pairs


def label_share(p: torch.Tensor) -> torch.Tensor:
    """k / R with k = round(R p) clamped to 1..R-1: both orders occur, so every stationary point is finite."""
    return torch.clamp(torch.round(p * ROWS_PER_PAIR), 1, ROWS_PER_PAIR - 1) / ROWS_PER_PAIR


def pair_rows(pairs: list[dict]) -> list[dict]:
    """R rows per pair: k = p_hat R with y+ chosen, the rest reversed."""
    rows = []
    for pair in pairs:
        k = round(pair["p_hat"] * ROWS_PER_PAIR)
        forward = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
        backward = {"prompt": pair["prompt"], "chosen": pair["rejected"], "rejected": pair["chosen"]}
        rows += [forward] * k + [backward] * (ROWS_PER_PAIR - k)
    return rows


def empirical_dpo_loss(delta_pi: torch.Tensor, delta_ref: torch.Tensor, p_hat: torch.Tensor) -> float:
    """Mean over pairs of p_hat dpo(y+, y-) + (1 - p_hat) dpo(y-, y+) (the library's `dpo_loss`)."""
    zero = torch.zeros_like(delta_pi)
    forward = dpo_loss(delta_pi, zero, delta_ref, zero, BETA)
    backward = dpo_loss(zero, delta_pi, zero, delta_ref, BETA)
    return float((p_hat * forward + (1 - p_hat) * backward).mean())


def trajectory(method: str, start: Path, rows_path: Path, out: Path, pairs: list[dict], plan: dict,
               seed: int) -> dict[str, list]:
    """Step `method`'s OfflineTrainer from the start; every eval_every steps score the distinct pairs."""
    objective, loss = METHODS[method]
    trainer = run_offline(objective, start, rows_path, out, steps=plan["steps"], batch_size=BATCH,
                          learning_rate=LEARNING_RATE, seed=seed, loss=loss, train_steps=False)
    model = trained_module(trainer)
    score = hf_policy_logprob_fn(model, trainer.tokenizer)
    prompts = [p["prompt"] for p in pairs]
    delta_ref = torch.tensor([p["delta_ref"] for p in pairs], dtype=torch.float64)
    p_hat = torch.tensor([p["p_hat"] for p in pairs], dtype=torch.float64)
    history = {"step": [], "delta_pi_mean": [], "frac_in_undesirable": [], "dpo_loss": [], "train_loss": [],
               "delta_pi_per_pair": []}
    window_loss, window_rows = 0.0, 0

    def record(step: int) -> None:
        model.eval()
        chosen = score(prompts, [p["chosen"] for p in pairs])
        delta_pi = chosen - score(prompts, [p["rejected"] for p in pairs])
        history["step"].append(step)
        history["delta_pi_mean"].append(float(delta_pi.mean()))
        history["frac_in_undesirable"].append(float(frac_in_undesirable(delta_pi, delta_ref)))
        history["dpo_loss"].append(empirical_dpo_loss(delta_pi, delta_ref, p_hat))
        history["train_loss"].append(window_loss / window_rows if window_rows else math.nan)
        history["delta_pi_per_pair"].append(delta_pi.tolist())

    record(0)
    for step in range(plan["steps"]):
        sums, _ = trainer.train_step(step)
        window_loss, window_rows = window_loss + float(sums["loss"]), window_rows + BATCH
        if (step + 1) % plan["eval_every"] == 0 or step + 1 == plan["steps"]:
            record(step + 1)
            window_loss, window_rows = 0.0, 0
    return history


def verdict(runs: dict, pairs: list[dict]) -> dict[str, str]:
    """What each method's final iterate shows, in words (nothing is asserted to come out one way)."""
    n_pairs, lines = len(pairs), {}
    for method, h in runs.items():
        final = torch.tensor(h["delta_pi_per_pair"][-1])
        positive = int((final > 0).sum())
        loss_fell = h["dpo_loss"][-1] < math.log(2)
        lines[method] = (f"delta_pi > 0 on {positive}/{n_pairs} pairs (mean {float(final.mean()):.2f}); "
                         f"frac in U {h['frac_in_undesirable'][-1]:.2f}; empirical DPO loss "
                         f"{h['dpo_loss'][0]:.3f} -> {h['dpo_loss'][-1]:.3f} "
                         f"({'below' if loss_fell else 'not below'} log 2)")
    dpo = runs["dpo"]
    dpo_in_u = dpo["dpo_loss"][-1] < math.log(2) and dpo["delta_pi_mean"][-1] < 0
    others = [m for m in runs if m != "dpo" and runs[m]["delta_pi_mean"][-1] > 0]
    dpo_says = "fell while mean delta_pi stayed negative" if dpo_in_u else "did NOT fall with delta_pi < 0"
    lines["summary"] = (f"DPO's loss {dpo_says}; mean delta_pi > 0 at the end for: "
                        f"{', '.join(others) or 'none'} (of {', '.join(m for m in runs if m != 'dpo')}).")
    return lines


def write_outputs(out_dir: Path, results: dict) -> None:
    runs, pairs = results["runs"], results["pairs"]
    pair_header = ["prompt", "chosen y+", "rejected y-", "delta*", "delta_ref", "p_hat",
                   "DPO stationary delta_pi"]
    pair_rows_md = [[p["prompt"], p["chosen"], p["rejected"], p["delta_target"], p["delta_ref"], p["p_hat"],
                     p["dpo_stationary_delta_pi"]] for p in pairs]
    header = ["objective", "mean delta_pi (start)", "mean delta_pi (final)", "pairs with delta_pi > 0",
              "frac in U (max)", "frac in U (final)", "DPO loss (start)", "DPO loss (final)"]
    rows = [[m, h["delta_pi_mean"][0], h["delta_pi_mean"][-1],
             f"{sum(d > 0 for d in h['delta_pi_per_pair'][-1])}/{len(pairs)}", max(h["frac_in_undesirable"]),
             h["frac_in_undesirable"][-1], h["dpo_loss"][0], h["dpo_loss"][-1]] for m, h in runs.items()]
    title = (f"After {results['protocol']['steps']} OfflineTrainer steps (beta={BETA}, CPO margin={MARGIN}); "
             f"log 2 = {math.log(2):.4f}; U = {{delta_pi < 0, delta_pi > delta_ref}}")
    write_table(out_dir, [
        ("Pairs: the target prefers y+, the reference (SFT start) strongly prefers y-",
         markdown_table(pair_header, pair_rows_md)),
        (title, markdown_table(header, rows)),
        ("What the data shows", "\n".join(f"- {m}: {line}" for m, line in results["verdict"].items()))])
    line_plot(out_dir / "delta_pi.png", {m: (h["step"], h["delta_pi_mean"]) for m, h in runs.items()},
              "optimizer step", "mean delta_pi = log pi(y+|x) - log pi(y-|x)",
              "Tiny Llama: policy preference over steps", hline=0.0)
    line_plot(out_dir / "frac_in_undesirable.png",
              {m: (h["step"], h["frac_in_undesirable"]) for m, h in runs.items()}, "optimizer step",
              "fraction of pairs in U", "Tiny Llama: pairs in the undesirable space U")
    line_plot(out_dir / "dpo_loss.png", {m: (h["step"], h["dpo_loss"]) for m, h in runs.items()},
              "optimizer step", "empirical DPO loss of the iterate", "Tiny Llama: DPO loss along each run",
              hline=math.log(2))


def run_lm(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    """Train every method of METHODS from the same SFT start; write results.json, table.md and plots."""
    out_dir = Path(out_dir)
    plan = QUICK if quick else FULL
    began = time.perf_counter()
    world = small_world(seed)
    # tiny tensors: one thread avoids the synchronisation that makes 2 threads ~10x slower on a busy machine
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]), single_thread():
        work = Path(tmp)
        start, start_logps = sft_start(world, work, plan, seed)
        pairs = select_pairs(world, world_logps(world), start_logps, plan["pairs_per_prompt"])
        write_jsonl(work / "pairs.jsonl", pair_rows(pairs))
        runs = {m: trajectory(m, start, work / "pairs.jsonl", work / m, pairs, plan, seed) for m in METHODS}
    protocol = {**plan, "world": world.to_dict(), "learning_rate": LEARNING_RATE, "batch_size": BATCH,
                "methods": {m: {"objective": o, "loss": k} for m, (o, k) in METHODS.items()},
                "rows_per_pair": ROWS_PER_PAIR, "min_target_gap": MIN_TARGET_GAP,
                "reference": "tiny Llama SFT'd on exact pi0 samples (also the start of every run)"}
    results = {"pairs": pairs, "runs": runs, "verdict": verdict(runs, pairs), "quick": quick, "seed": seed,
               "protocol": protocol}
    results["seconds"] = time.perf_counter() - began
    write_outputs(out_dir, results)
    write_results(out_dir, results)
    print(f"undesirable-space (lm): {results['seconds']:.1f} s; {results['verdict']['summary']}")
    return results
