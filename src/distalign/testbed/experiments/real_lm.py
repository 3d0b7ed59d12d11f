"""`distalign testbed real-lm`: seed 001's Table 2 on a real chat model whose target is known exactly.

    distalign testbed real-lm --quick --out runs/real-lm-quick          # the test's few-minute version
    distalign testbed real-lm --out runs/real-lm                        # the full run (see README)
    distalign testbed real-lm --config configs/real_lm.yaml --out runs/real-lm select=true

World (`testbed.real_lm`): M = SmolLM2-135M-Instruct; pi*(y|x) = M(y | S, x) with a hidden system prompt
S ("Always answer in French" after the default one), pi0(y|x) = M(y | x); responses of at most L new tokens, ended by EOS or cut at L, whose
log-probs are exact under both. Prompts: `real_lm_prompts` (made from the standard library's own
names and docstrings; train / validation / test). Data: pairs of pi0 samples labelled by
sigmoid(gamma (log pi*(a) - log pi*(b))) (`real_lm_data`), a reward model trained on them, pi*
samples for SFT. Methods (`real_lm_methods`): each from pi0 with LoRA through the library's trainers
(`real_lm_runs`); metrics on the test prompts (`real_lm_eval`); outputs `real_lm_report`.

Stages, each kept on disk under <out>/work so an interrupted run continues where it stopped
(a crash in method 6 does not redo methods 1-5): model -> pool of pairs -> data files ->
evaluation samples -> reward model -> [learning-rate selection] -> methods -> rate -> outputs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distalign.config import load_config
from distalign.config.testbed import RealLMConfig
from distalign.models import load_policy, load_reward_model
from distalign.objectives import PairLogps, get_pairwise_objective

from ..lm_data import write_jsonl
from ..real_lm import FRENCH, PRECISION, RealLMWorld, calibration_seconds, mc_kl, smollm2_folder
from ..real_lm_data import (
    as_tensor,
    build_pool,
    demonstration_rows,
    label_pairs,
    label_statistics,
    pass_order,
    prompt_rows,
    write_pair_files,
)
from ..real_lm_prompts import load_prompts
from .real_lm_eval import EvalSet, evaluate_policy, evaluate_target, reward_model_accuracy
from .real_lm_methods import method_specs, slug, spec_by_name
from .real_lm_runs import RunContext, train_method, train_reward_model, train_to_convergence

QUICK = {"n_pairs": 48, "rate_ns": [16, 48], "max_new_tokens": 12, "batch_size": 8, "epochs": 2.0, "rm_epochs": 2.0,
         "eval_per_prompt": 2, "n_train_prompts": 48, "n_eval_prompts": 16, "rate_max_epochs": 3,
         "n_heldout_pairs": 16}
FULL = {"n_pairs": 1000, "rate_ns": [250, 1000, 4000], "max_new_tokens": 32, "batch_size": 16, "epochs": 2.0,
        "rm_epochs": 2.0, "eval_per_prompt": 2, "n_train_prompts": None, "n_eval_prompts": None,
        "rate_max_epochs": 6, "n_heldout_pairs": 128}
RM_LEARNING_RATE = 3e-4
QUIET_CALIBRATION = 1.89        # `calibration_seconds` on the quiet 2-core machine (PERFORMANCE.md)
RATE = {"pmle": (lambda gamma: (f"loss.gamma={gamma}",), 5e-4), "dpo": (lambda gamma: (f"loss.beta={gamma}",), 5e-4)}
RATE_TOLERANCE = 0.01           # stop when one epoch lowers the empirical objective by < 1 %
# Learning rates chosen on the validation split (`select=true`); a method missing here takes its grid's first.
CHOSEN_LEARNING_RATES: dict[str, float] = {}


def _plan(cfg: RealLMConfig) -> dict:
    return {**(QUICK if cfg.quick else FULL), **cfg.plan_overrides()}


def _questions(split: str, limit: int | None) -> list[str]:
    rows = [r["prompt"] for r in load_prompts(split)]
    return rows[:limit] if limit else rows


class Stage:
    """A named stage with a progress bar and its wall time, logged to <work>/timings.json."""

    def __init__(self, work: Path, name: str, total: int | None = None):
        self.work, self.name, self.total = work, name, total

    def __enter__(self):
        self.start = time.perf_counter()
        self.bar = tqdm(total=self.total, desc=f"real-lm: {self.name}", dynamic_ncols=True)
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()
        path = self.work / "timings.json"
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - self.start
        path.write_text(json.dumps(timings, indent=1))


def prepare_data(world: RealLMWorld, cfg: RealLMConfig, plan: dict, work: Path) -> tuple[dict, dict]:
    """Pool, labels, the trainers' files and the label statistics; returns (files, data summary)."""
    train = _questions("train", plan["n_train_prompts"])
    n_pool = max([plan["n_pairs"], *plan["rate_ns"]]) if cfg.rate else plan["n_pairs"]
    with Stage(work, "pairs (pi0 samples + exact log-probs)", n_pool) as bar:
        pool = build_pool(world, train, n_pool, work / "pool.jsonl", cfg.seed, progress=bar)
    rows = label_pairs(pool, cfg.gamma, cfg.seed + 1, cfg.label_gamma, cfg.label_noise)
    data = work / "data"
    files = {"prompts": data / "prompts.jsonl", "demos": data / "demonstrations.jsonl"}
    for n in sorted({plan["n_pairs"], *(plan["rate_ns"] if cfg.rate else [])}):
        write_pair_files(world, rows[:n], data / f"pairs-{n}.jsonl", data / f"rm-pairs-{n}.jsonl")
    files["pairs"], files["rm_pairs"] = data / f"pairs-{plan['n_pairs']}.jsonl", data / f"rm-pairs-{plan['n_pairs']}.jsonl"
    write_jsonl(files["prompts"], prompt_rows(train))
    if not files["demos"].is_file():
        with Stage(work, "pi* demonstrations", plan["n_pairs"]) as bar:
            write_jsonl(files["demos"], demonstration_rows(world, pass_order(train, plan["n_pairs"], cfg.seed + 2),
                                                           cfg.seed + 3))
            bar.update(plan["n_pairs"])
    summary = {"train_prompts": len(train), "pool": len(pool),
               "labels": label_statistics(rows[:plan["n_pairs"]], cfg.gamma),
               "labels_rate_pool": label_statistics(rows, cfg.gamma),
               "truncated_share_pi0": sum(world.truncated([r["a_ids"] for r in pool])) / len(pool),
               "sampler_gap": _sampler_gap(world, train, cfg.seed, work)}
    return {k: str(v) for k, v in files.items()}, summary


def _sampler_gap(world: RealLMWorld, questions: list[str], seed: int, work: Path) -> dict:
    path = work / "sampler_gap.json"
    if not path.is_file():
        path.write_text(json.dumps(world.sampler_gap(questions[:32], seed + 11)))
    return json.loads(path.read_text())


def heldout_pairs(world: RealLMWorld, cfg: RealLMConfig, plan: dict, work: Path) -> list[dict]:
    """Labelled pairs at the validation prompts: the rate runs' held-out objective."""
    questions = _questions("validation", plan["n_eval_prompts"])
    with Stage(work, "held-out pairs (validation prompts)", plan["n_heldout_pairs"]) as bar:
        pool = build_pool(world, questions, plan["n_heldout_pairs"], work / "pool-validation.jsonl", cfg.seed + 5,
                          progress=bar)
    return label_pairs(pool, cfg.gamma, cfg.seed + 6, cfg.label_gamma, cfg.label_noise)


def evaluate_row(world, shared, path: Path, seed: int, model_dir: str | None) -> dict:
    """Evaluate a policy folder (its LoRA adapter merged) or pi0 (None), caching the row in `path`."""
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    policy = None
    if model_dir is not None:
        policy = load_policy(model_dir).merge_and_unload().eval().requires_grad_(False)
    row = {**evaluate_policy(world, shared, policy, seed), "eval_seconds": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def select_learning_rates(world, specs, ctx: RunContext, plan: dict, cfg: RealLMConfig, work: Path) -> dict:
    """Each spec's learning rate: the grid value with the lowest KL(pi*||pi) on the validation prompts."""
    validation = EvalSet.cached(work / "validation_set.json", world, _questions("validation", plan["n_eval_prompts"]),
                                1, cfg.seed + 500)
    chosen = {}
    with Stage(work, "select learning rates (validation)", sum(len(s.lr_grid) for s in specs)) as bar:
        for spec in specs:
            scores = {}
            for lr in spec.lr_grid:
                folder = train_method(spec, ctx, lr, work / "select" / f"{slug(spec.name)}-lr{lr:g}")
                row = evaluate_row(world, validation, work / "select" / f"{slug(spec.name)}-lr{lr:g}.json",
                                   cfg.seed + 600, str(folder))
                scores[lr] = row["kl_target_to_policy"]
                bar.update(1)
            chosen[spec.name] = {"learning_rate": min(scores, key=scores.get), "validation_kl": scores}
    (work / "selected.json").write_text(json.dumps(chosen, indent=1))
    return chosen


def learning_rate(spec, selected: dict) -> float:
    if spec.name in selected:
        return selected[spec.name]["learning_rate"]
    return CHOSEN_LEARNING_RATES.get(spec.name, spec.lr_grid[0])


def run_methods(world, specs, ctx: RunContext, shared: EvalSet, selected: dict, cfg: RealLMConfig, work: Path) -> dict:
    """Train and evaluate each row; a row already on disk (an earlier, interrupted run) is read back."""
    rows = {}
    with Stage(work, "methods (train + evaluate)", len(specs)) as bar:
        for i, spec in enumerate(specs):
            bar.set_postfix_str(spec.name)
            lr, run_dir = learning_rate(spec, selected), work / "runs" / slug(spec.name)
            start = time.perf_counter()
            folder = train_method(spec, ctx, lr, run_dir)
            timing = run_dir / "train_seconds.json"
            if not timing.is_file():
                timing.write_text(json.dumps(time.perf_counter() - start))
            row = evaluate_row(world, shared, work / "evals" / f"{slug(spec.name)}.json", cfg.seed + 100 + i, str(folder))
            rows[spec.name] = {**row, "learning_rate": lr, "settings": list(spec.settings), "method": spec.method,
                               "reward": spec.reward, "pair": spec.pair,
                               "train_seconds": json.loads(timing.read_text())}
            bar.update(1)
    return rows


def rate_probe(world: RealLMWorld, shared: EvalSet, heldout: list[dict], method: str, gamma: float):
    """probe(model) -> the method's objective on held-out pairs (validation prompts) and exact KL(pi*||pi)
    on the test prompts' pi* samples: what `train_to_convergence` records after each epoch."""
    objective, hparams = get_pairwise_objective(method), {"pmle": {"gamma": gamma}, "dpo": {"beta": gamma}}[method]
    questions = [r["question"] for r in heldout]
    chosen, rejected = [r["chosen_ids"] for r in heldout], [r["rejected_ids"] for r in heldout]
    lengths = (torch.tensor([float(len(c)) for c in chosen]), torch.tensor([float(len(r)) for r in rejected]))
    refs = (as_tensor(heldout, "ref_chosen"), as_tensor(heldout, "ref_rejected"))

    def probe(model) -> dict:
        a, b = world.pair_logps(questions, chosen, rejected, "reference", model=model)
        heldout_loss = objective(PairLogps(a, b, *lengths, *refs), **hparams).mean()
        kl = mc_kl(shared.target_star, world.logps(shared.questions, shared.target, "reference", model=model))
        return {"heldout_objective": float(heldout_loss), "kl_target_to_policy": kl[0],
                "kl_target_to_policy_stderr": kl[1]}
    return probe


def run_rate(world, ctx: RunContext, shared: EvalSet, heldout: list[dict], plan: dict, cfg: RealLMConfig,
             work: Path) -> dict:
    """PMLE and DPO at each n, trained until the empirical objective stops improving (`RATE_TOLERANCE`);
    per epoch: the objective, the held-out objective and exact KL(pi*||pi)."""
    results = {m: {} for m in RATE}
    with Stage(work, "rate (pmle, dpo to convergence)", len(RATE) * len(plan["rate_ns"])) as bar:
        for method, (settings, lr) in RATE.items():
            probe = rate_probe(world, shared, heldout, method, cfg.gamma)
            for n in plan["rate_ns"]:
                pairs = Path(ctx.files["pairs"]).with_name(f"pairs-{n}.jsonl")
                _, record = train_to_convergence(method, settings(cfg.gamma), ctx, pairs, n,
                                                 work / "rate" / f"{method}-n{n}", lr, plan["rate_max_epochs"],
                                                 RATE_TOLERANCE, probe)
                final = record["history"][-1]
                best = min(record["history"][1:], key=lambda h: h["heldout_objective"])
                results[method][n] = {**record, "epochs": final["epoch"], "learning_rate": lr,
                                      "kl_target_to_policy": final["kl_target_to_policy"],
                                      "kl_target_to_policy_stderr": final["kl_target_to_policy_stderr"],
                                      "best_heldout_epoch": best["epoch"],
                                      "kl_at_best_heldout": best["kl_target_to_policy"]}
                bar.update(1)
    return results


def run(out_dir: Path, quick: bool = False, seed: int = 0, config: RealLMConfig | None = None) -> dict:
    cfg = config or load_config(RealLMConfig, None, [f"quick={str(quick).lower()}", f"seed={seed}"])
    plan, out = _plan(cfg), Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model_dir = cfg.model or str(smollm2_folder(cfg.cache_dir or out / "cache"))
    system = cfg.system_prompt or FRENCH
    world = RealLMWorld.load(model_dir, system_prompt=system, max_new_tokens=plan["max_new_tokens"], gamma=cfg.gamma)
    calibration = calibration_seconds(world.model)
    files, data_summary = prepare_data(world, cfg, plan, work)
    with Stage(work, "evaluation samples (pi*, pi0 on test prompts)") as bar:
        shared = EvalSet.cached(work / "eval_set.json", world, _questions("test", plan["n_eval_prompts"]),
                                plan["eval_per_prompt"], cfg.seed + 7)
        bar.update(1)
    ctx = RunContext(model_dir, files, plan["n_pairs"], plan["max_new_tokens"], plan["batch_size"], plan["epochs"],
                     cfg.seed, {"model_dir": model_dir, "system_prompt": system,
                                "max_new_tokens": plan["max_new_tokens"], "gamma": cfg.gamma})
    specs = spec_by_name(method_specs(cfg.gamma), cfg.methods)
    if any(s.uses_reward_model for s in specs):
        with Stage(work, "reward model", 1) as bar:
            ctx.reward_model = str(train_reward_model(ctx, RM_LEARNING_RATE, work / "runs" / "reward-model",
                                                      plan["rm_epochs"]))
            bar.update(1)
        shared.rm = load_reward_model(ctx.reward_model).eval().requires_grad_(False)
    selected = select_learning_rates(world, specs, ctx, plan, cfg, work) if cfg.select else {}
    if not selected and (work / "selected.json").is_file():
        selected = json.loads((work / "selected.json").read_text())
    with Stage(work, "reference rows (pi0, pi*)", 2) as bar:
        rows = {"pi0 (start)": evaluate_row(world, shared, work / "evals" / "pi0.json", cfg.seed + 90, None)}
        bar.update(1)
        target_path = work / "evals" / "pi-star.json"
        if not target_path.is_file():
            target_path.write_text(json.dumps(evaluate_target(world, shared, cfg.seed + 91)))
        rows["pi* (target)"] = json.loads(target_path.read_text())
        bar.update(1)
    rows.update(run_methods(world, specs, ctx, shared, selected, cfg, work))
    rate = {}
    if cfg.rate:
        heldout = heldout_pairs(world, cfg, plan, work)
        rate = run_rate(world, ctx, shared, heldout, plan, cfg, work)
    results = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "plan": plan,
               "world": world.describe(), "precision": PRECISION.__dict__, "data": data_summary, "rows": rows,
               "rate": rate, "selected": selected,
               "reward_model_accuracy": reward_model_accuracy(world, shared, shared.rm) if shared.rm else None,
               "timings": json.loads((work / "timings.json").read_text()), "seconds": time.perf_counter() - began,
               "calibration_seconds": calibration, "calibration_seconds_quiet": QUIET_CALIBRATION}
    from .real_lm_report import write_outputs
    write_outputs(out, results)
    return results
