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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distalign.config import load_config
from distalign.config.testbed import RealLMConfig
from distalign.data.files import write_text_atomic
from distalign.models import load_policy
from distalign.objectives import PairLogps, get_pairwise_objective

from ..lm_data import write_jsonl
from ..real_lm import FRENCH, PRECISION, RealLMWorld, calibration_seconds, mc_kl, smollm2_folder
from ..real_lm_data import (
    as_tensor,
    build_pool,
    demonstration_rows,
    label_pairs,
    label_statistics,
    pair_records,
    pass_order,
    prompt_rows,
    share_world,
    write_pair_files,
)
from ..real_lm_prompts import load_prompts
from .real_lm_eval import (
    TARGET_LOGPS,
    EvalSet,
    evaluate_policy,
    evaluate_target,
    paired_kl_difference,
    reward_model_accuracy,
    target_sample_logps,
)
from .real_lm_methods import method_specs, slug, spec_by_name
from .real_lm_runs import (
    RunContext,
    memory_mb,
    release_memory,
    reset_peak_memory,
    train_method,
    train_reward_model,
    train_to_convergence,
)

QUICK = {"n_pairs": 16, "rate_ns": [8, 16], "max_new_tokens": 8, "batch_size": 8, "epochs": 2.0, "rm_epochs": 2.0,
         "eval_per_prompt": 2, "n_train_prompts": 16, "n_eval_prompts": 12, "rate_max_epochs": 1,
         "n_heldout_pairs": 8}
# The full plan: 128 pairs per method, L = 16, 256 evaluation samples (128 test prompts x 2); the rate at
# n = 250, 1000, 4000 (issue 18). README: per-stage times.
FULL = {"n_pairs": 128, "rate_ns": [250, 1000, 4000], "max_new_tokens": 16, "batch_size": 16, "epochs": 2.0,
        "rm_epochs": 2.0, "eval_per_prompt": 2, "n_train_prompts": None, "n_eval_prompts": 128,
        "rate_max_epochs": 4, "n_heldout_pairs": 64}
RM_LEARNING_RATE = 3e-4
QUIET_CALIBRATION = 1.89        # `calibration_seconds` on the quiet 2-core machine (PERFORMANCE.md)
RATE = {"pmle": (lambda gamma: (f"loss.gamma={gamma}",), 5e-4), "dpo": (lambda gamma: (f"loss.beta={gamma}",), 5e-4)}
RATE_TOLERANCE = 0.01           # stop when one epoch lowers the empirical objective by < 1 %
# The stopping rule's empirical objective is the mean loss over (at most) this many of the n training pairs:
# the same pairs each epoch, so the epoch-to-epoch change is paired; scoring all 4000 each epoch would cost
# a third of the epoch's training.
RATE_CHECK_PAIRS = 512
# Learning rates chosen on the validation split (`select=true`); a method missing here takes its grid's first.
CHOSEN_LEARNING_RATES: dict[str, float] = {}


def _plan(cfg: RealLMConfig) -> dict:
    return {**(QUICK if cfg.quick else FULL), **cfg.plan_overrides()}


def _questions(split: str, limit: int | None) -> list[str]:
    rows = [r["prompt"] for r in load_prompts(split)]
    return rows[:limit] if limit else rows


class Stage:
    """A named stage with a progress bar (count and ETA); its wall time goes to <work>/timings.json (summed
    over resumed runs) and the process's memory after it to <work>/memory.json (resident MB now, and the
    process's peak so far), so a stage that holds memory it should have freed shows up."""

    def __init__(self, work: Path, name: str, total: int | None = None):
        self.work, self.name, self.total = work, name, total

    def __enter__(self):
        self.start = time.perf_counter()
        reset_peak_memory()
        self.bar = tqdm(total=self.total, desc=f"real-lm: {self.name}", dynamic_ncols=True)
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()
        _update_json(self.work / "timings.json",
                     lambda t: {**t, self.name: t.get(self.name, 0.0) + time.perf_counter() - self.start})
        release_memory()
        _update_json(self.work / "memory.json", lambda m: {**m, self.name: memory_mb()})


def _update_json(path: Path, change) -> None:
    """Read, change and replace a small JSON record in one step (atomic replace: a second process running
    other rows on the same <out> never reads half a file; a lost update needs both to write within ms)."""
    write_text_atomic(path, json.dumps(change(json.loads(path.read_text()) if path.is_file() else {}), indent=1))


def labels(pool: list[dict], cfg: RealLMConfig, salt: int) -> list[dict]:
    """The pool's pairs labelled by the config's preference model (gamma, and the misspecification
    switches label_gamma, label_noise), with the label draws seeded by (seed, salt)."""
    return label_pairs(pool, cfg.gamma, cfg.seed + salt, cfg.label_gamma, cfg.label_noise)


def prepare_data(world: RealLMWorld, cfg: RealLMConfig, plan: dict, work: Path) -> tuple[dict, dict]:
    """Pool, labels, the trainers' files and the label statistics; returns (files, data summary). The rate's
    larger pool extends the same file later (`rate_pairs`), so the main comparison does not wait for it."""
    train = _questions("train", plan["n_train_prompts"])
    with Stage(work, "pairs (pi0 samples + exact log-probs)", plan["n_pairs"]) as bar:
        pool = build_pool(world, train, plan["n_pairs"], work / "pool.jsonl", cfg.seed, progress=bar)
    rows = labels(pool, cfg, salt=1)
    data = work / "data"
    files = {"prompts": data / "prompts.jsonl", "demos": data / "demonstrations.jsonl",
             "pairs": data / f"pairs-{plan['n_pairs']}.jsonl", "rm_pairs": data / f"rm-pairs-{plan['n_pairs']}.jsonl"}
    write_pair_files(world, rows, files["pairs"], files["rm_pairs"])
    write_jsonl(files["prompts"], prompt_rows(train))
    if not files["demos"].is_file():
        with Stage(work, "pi* demonstrations", plan["n_pairs"]) as bar:
            write_jsonl(files["demos"], demonstration_rows(world, pass_order(train, plan["n_pairs"], cfg.seed + 2),
                                                           cfg.seed + 3))
            bar.update(plan["n_pairs"])
    summary = {"train_prompts": len(train), "pool": len(pool), "labels": label_statistics(rows, cfg.gamma),
               "truncated_share_pi0": sum(world.truncated([r["a_ids"] for r in pool])) / len(pool),
               "sampler_gap": _sampler_gap(world, train, cfg.seed, work)}
    return {k: str(v) for k, v in files.items()}, summary


def rate_pairs(world: RealLMWorld, cfg: RealLMConfig, plan: dict, work: Path) -> tuple[dict, dict, list[dict]]:
    """The rate experiment's nested pair files (prefixes of one pool, the main comparison's pool extended):
    {n: `rate_pair_path`}, the label statistics of the largest, and its labelled rows."""
    train = _questions("train", plan["n_train_prompts"])
    n_pool = max(plan["rate_ns"])
    with Stage(work, "rate pairs (pool extended)", n_pool) as bar:
        pool = build_pool(world, train, n_pool, work / "pool.jsonl", cfg.seed, progress=bar)
    rows = labels(pool, cfg, salt=1)
    paths = {}
    for n in sorted(plan["rate_ns"]):
        paths[n] = rate_pair_path(work, n)
        write_jsonl(paths[n], pair_records(world, rows[:n]))
        write_jsonl(rate_pair_path(work, n, check=True), pair_records(world, rows[:min(n, RATE_CHECK_PAIRS)]))
    return paths, label_statistics(rows, cfg.gamma), rows


def rate_pair_path(work: Path, n: int, check: bool = False) -> Path:
    """The first n pairs of the rate pool; `check`: the first min(n, RATE_CHECK_PAIRS) of them, on which
    the stopping rule measures the empirical objective."""
    return work / "data" / (f"rate-pairs-{n}-check.jsonl" if check else f"rate-pairs-{n}.jsonl")


def _sampler_gap(world: RealLMWorld, questions: list[str], seed: int, work: Path) -> dict:
    path = work / "sampler_gap.json"
    if not path.is_file():
        write_text_atomic(path, json.dumps(world.sampler_gap(questions[:32], seed + 11)))
    return json.loads(path.read_text())


def heldout_pairs(world: RealLMWorld, cfg: RealLMConfig, plan: dict, work: Path) -> list[dict]:
    """Labelled pairs at the validation prompts: the rate runs' held-out objective."""
    questions = _questions("validation", plan["n_eval_prompts"])
    with Stage(work, "held-out pairs (validation prompts)", plan["n_heldout_pairs"]) as bar:
        pool = build_pool(world, questions, plan["n_heldout_pairs"], work / "pool-validation.jsonl", cfg.seed + 5,
                          progress=bar)
    return labels(pool, cfg, salt=6)


def evaluate_row(world, shared, path: Path, seed: int, model_dir: str | None) -> dict:
    """Evaluate a policy folder (its LoRA adapter merged) or pi0 (None), caching the row in `path`; a cached
    row counts only for the same saved model (a retrained row is evaluated again)."""
    stamp = _model_stamp(model_dir)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("model_stamp") == stamp and TARGET_LOGPS in cached:
        return cached
    start = time.perf_counter()
    policy = None
    if model_dir is not None:
        policy = load_policy(model_dir).merge_and_unload().eval().requires_grad_(False)
    if cached and cached.get("model_stamp") == stamp:      # cached before rows kept their per-sample log-probs
        row = {**cached, TARGET_LOGPS: target_sample_logps(world, shared, policy).tolist()}
    else:
        row = {**evaluate_policy(world, shared, policy, seed), "eval_seconds": time.perf_counter() - start,
               "model_stamp": stamp}
    del policy
    release_memory()
    write_text_atomic(path, json.dumps(row))
    return row


def validation_kl(world, validation: EvalSet, path: Path, model_dir: str) -> float:
    """KL(pi*||pi) of a policy folder on the validation prompts' pi* samples (one scoring forward; the
    selection needs nothing else), cached in `path` for the same saved model."""
    def compute() -> dict:
        kl = mc_kl(validation.target_star, _policy_target_logps(world, validation, model_dir))
        return {"kl_target_to_policy": kl[0], "kl_target_to_policy_stderr": kl[1]}
    return _stamped(path, model_dir, compute)["kl_target_to_policy"]


def cached_rm_accuracy(world, shared: EvalSet, path: Path) -> dict:
    """`reward_model_accuracy`, cached in `path` for the same saved reward model (a resumed run does not
    score the evaluation set with it again)."""
    record = _stamped(path, shared.rm, lambda: reward_model_accuracy(world, shared))
    return {k: v for k, v in record.items() if k != "model_stamp"}


def _stamped(path: Path, model_dir: str | None, compute) -> dict:
    """`compute()` (a JSON-able dict), cached in `path` with the `_model_stamp` of the saved model it
    describes; recomputed when that model was saved again."""
    stamp = _model_stamp(model_dir)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("model_stamp") == stamp:
            return cached
    record = {**compute(), "model_stamp": stamp}
    write_text_atomic(path, json.dumps(record))
    return record


def _policy_target_logps(world, evalset: EvalSet, model_dir: str) -> torch.Tensor:
    """`target_sample_logps` of a saved policy folder (its LoRA adapter merged), the policy freed after."""
    policy = load_policy(model_dir).merge_and_unload().eval().requires_grad_(False)
    logps = target_sample_logps(world, evalset, policy)
    del policy
    release_memory()
    return logps


def _model_stamp(model_dir: str | None) -> str | None:
    """Which saved model a cached evaluation belongs to: its folder and its weights file's mtime."""
    if model_dir is None:
        return None
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return f"{model_dir}@{max(f.stat().st_mtime_ns for f in files)}" if files else model_dir


def timed_training(spec, ctx: RunContext, lr: float, run_dir: Path) -> tuple[Path, float]:
    """`train_method`, with its wall time kept beside the run (a resumed run keeps the first full timing)."""
    start = time.perf_counter()
    folder = train_method(spec, ctx, lr, run_dir)
    release_memory()
    timing = run_dir / "train_seconds.json"
    if not timing.is_file():
        write_text_atomic(timing, json.dumps(time.perf_counter() - start))
    return folder, json.loads(timing.read_text())


def choose_learning_rate(world, spec, ctx: RunContext, validation: EvalSet, cfg: RealLMConfig, work: Path) -> dict:
    """Train `spec` at each learning rate of its grid (training prompts, the full budget each) and keep
    the one whose policy has the lowest KL(pi*||pi) on the validation prompts; that run is the row's
    model (nothing is retrained). Returns {learning_rate, validation_kl, folder, train_seconds}."""
    path = work / "selected.json"
    selected = json.loads(path.read_text()) if path.is_file() else {}
    if spec.name not in selected:
        scores, runs = {}, {}
        for lr in spec.lr_grid:
            run_dir = work / "select" / f"{slug(spec.name)}-lr{lr:g}"
            runs[lr] = timed_training(spec, ctx, lr, run_dir)
            scores[lr] = validation_kl(world, validation, work / "select" / f"{slug(spec.name)}-lr{lr:g}.json",
                                       str(runs[lr][0]))
        best = min(scores, key=scores.get)
        choice = {"learning_rate": best, "validation_kl": {f"{lr:g}": v for lr, v in scores.items()},
                  "folder": str(runs[best][0]), "train_seconds": runs[best][1],
                  "grid_train_seconds": sum(t for _, t in runs.values())}
        _update_json(path, lambda chosen: {**chosen, spec.name: choice})   # read again: rows may run in parallel
        return choice
    return selected[spec.name]


@dataclass
class Setup:
    """What every row and rate run of one experiment reads, made (or read back) by `prepare`."""
    cfg: RealLMConfig
    plan: dict
    out: Path
    world: RealLMWorld
    shared: EvalSet
    ctx: RunContext
    specs: list
    data_summary: dict
    rows: dict              # the reference rows (pi0, pi*)
    rm_accuracy: dict | None

    @property
    def work(self) -> Path:
        return self.out / "work"


def prepare(out: Path, cfg: RealLMConfig) -> Setup:
    """Every stage before the rows: model, pool, data files, evaluation samples, reward model, reference
    rows; each read back from <out>/work when an earlier run (or the main process) made it."""
    plan, work = _plan(cfg), out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = cfg.model or str(smollm2_folder(cfg.cache_dir or out / "cache"))
    system = cfg.system_prompt or FRENCH
    world = RealLMWorld.load(model_dir, system_prompt=system, max_new_tokens=plan["max_new_tokens"], gamma=cfg.gamma)
    share_world(world)          # the oracle reward scores with this model, not a second copy
    files, data_summary = prepare_data(world, cfg, plan, work)
    with Stage(work, "evaluation samples (pi*, pi0 on test prompts)", 3) as bar:
        shared = EvalSet.cached(work / "eval_set.json", world, _questions("test", plan["n_eval_prompts"]),
                                plan["eval_per_prompt"], cfg.seed + 7, progress=bar)
    ctx = RunContext(model_dir, files, plan["n_pairs"], plan["max_new_tokens"], plan["batch_size"], plan["epochs"],
                     cfg.seed, {"model_dir": model_dir, "system_prompt": system,
                                "max_new_tokens": plan["max_new_tokens"], "gamma": cfg.gamma},
                     prompt_tokens=max(map(len, world.prompt_ids(_questions("train", plan["n_train_prompts"]),
                                                                 "reference"))))
    specs = spec_by_name(method_specs(cfg.gamma), cfg.methods)
    if any(s.uses_reward_model for s in specs):
        with Stage(work, "reward model", 1) as bar:
            ctx.reward_model = str(train_reward_model(ctx, RM_LEARNING_RATE, work / "runs" / "reward-model",
                                                      plan["rm_epochs"]))
            bar.update(1)
        shared.rm = ctx.reward_model
    rows = reference_rows(world, shared, cfg, work)
    rm_accuracy = cached_rm_accuracy(world, shared, work / "reward_model_accuracy.json") if shared.rm else None
    return Setup(cfg, plan, out, world, shared, ctx, specs, data_summary, rows, rm_accuracy)


def _validation_set(setup: Setup) -> EvalSet | None:
    if not setup.cfg.select:
        return None
    return EvalSet.cached(setup.work / "validation_set.json", setup.world,
                          _questions("validation", setup.plan["n_eval_prompts"]), 1, setup.cfg.seed + 500)


def run_row(setup: Setup, spec, validation: EvalSet | None) -> dict:
    """Train one row (choosing its learning rate on the validation split when given one) and evaluate
    it; everything cached, so calling it for a finished row only reads it back. The evaluation seed
    comes from the row's place in the full table, so it does not depend on which rows run or where."""
    work, cfg = setup.work, setup.cfg
    reset_peak_memory()
    if validation is not None:
        chosen = choose_learning_rate(setup.world, spec, setup.ctx, validation, cfg, work)
        lr, folder, seconds = chosen["learning_rate"], Path(chosen["folder"]), chosen["train_seconds"]
    else:
        lr = CHOSEN_LEARNING_RATES.get(spec.name, spec.lr_grid[0])
        folder, seconds = timed_training(spec, setup.ctx, lr, work / "runs" / slug(spec.name))
    index = [s.name for s in method_specs(cfg.gamma)].index(spec.name)
    row = evaluate_row(setup.world, setup.shared, work / "evals" / f"{slug(spec.name)}.json",
                       cfg.seed + 100 + index, str(folder))
    return {**row, "learning_rate": lr, "settings": list(spec.settings), "method": spec.method,
            "reward": spec.reward, "pair": spec.pair, "train_seconds": seconds,
            "lr_chosen_on": "validation" if validation is not None else "fixed", "memory_mb": memory_mb()}


def run_methods(setup: Setup, on_row=None) -> dict:
    """Every row of `setup.specs` in turn; a row already on disk (an earlier, interrupted run) is read
    back. `on_row(rows)` after each row (the outputs are rewritten, so an interrupted run leaves a table
    of what finished)."""
    rows = {}
    validation = _validation_set(setup)
    with Stage(setup.work, "methods (train + evaluate)", len(setup.specs)) as bar:
        for spec in setup.specs:
            bar.set_postfix_str(spec.name)
            rows[spec.name] = run_row(setup, spec, validation)
            bar.update(1)
            if on_row is not None:
                on_row(rows)
    return rows


def rate_probe(world: RealLMWorld, shared: EvalSet, heldout: list[dict], method: str, gamma: float):
    """probe(model) -> the method's objective on held-out pairs (validation prompts) and exact KL(pi*||pi)
    on the test prompts' pi* samples: what `train_to_convergence` records after each epoch."""
    objective, hparams = get_pairwise_objective(method), _rate_hparams(method, gamma)
    questions = [r["question"] for r in heldout]
    chosen, rejected = [r["chosen_ids"] for r in heldout], [r["rejected_ids"] for r in heldout]
    lengths = (torch.tensor([float(len(c)) for c in chosen]), torch.tensor([float(len(r)) for r in rejected]))
    refs = (as_tensor(heldout, "ref_chosen"), as_tensor(heldout, "ref_rejected"))

    def probe(model) -> dict:
        a, b = world.pair_logps(questions, chosen, rejected, "reference", model=model)
        heldout_loss = objective(PairLogps(a, b, *lengths, *refs), **hparams).mean()
        logps = target_sample_logps(world, shared, model)
        kl = mc_kl(shared.target_star, logps)
        return {"heldout_objective": float(heldout_loss), "kl_target_to_policy": kl[0],
                "kl_target_to_policy_stderr": kl[1], TARGET_LOGPS: logps.tolist()}
    return probe


def _rate_hparams(method: str, gamma: float) -> dict:
    return {"pmle": {"gamma": gamma}, "dpo": {"beta": gamma}}[method]


def objective_at_target(rows: list[dict], method: str, gamma: float) -> float:
    """The rate objective of pi* itself on labelled pairs (from their exact log pi* and log pi0): what an
    estimator that recovered pi* would score there. An empirical objective far below it is a fit to the
    label draws, not to pi*."""
    lengths = (torch.tensor([float(len(r["chosen_ids"])) for r in rows]),
               torch.tensor([float(len(r["rejected_ids"])) for r in rows]))
    logps = PairLogps(as_tensor(rows, "star_chosen"), as_tensor(rows, "star_rejected"), *lengths,
                      as_tensor(rows, "ref_chosen"), as_tensor(rows, "ref_rejected"))
    return float(get_pairwise_objective(method)(logps, **_rate_hparams(method, gamma)).mean())


def rate_run(setup: Setup, heldout: list[dict], method: str, n: int, rows: list[dict]) -> dict:
    """One rate point: `method` on the first n of the labelled `rows`, trained until the empirical objective
    stops improving (`RATE_TOLERANCE`); per epoch the objective, the held-out objective and exact
    KL(pi*||pi); and pi*'s own objective on the same pairs, the yardstick of the fit."""
    settings, lr = RATE[method]
    probe = rate_probe(setup.world, setup.shared, heldout, method, setup.cfg.gamma)
    _, record = train_to_convergence(method, settings(setup.cfg.gamma), setup.ctx, rate_pair_path(setup.work, n), n,
                                     setup.work / "rate" / f"{method}-n{n}", lr, setup.plan["rate_max_epochs"],
                                     RATE_TOLERANCE, probe, check_file=rate_pair_path(setup.work, n, check=True))
    release_memory()
    final = record["history"][-1]
    if TARGET_LOGPS not in final:       # recorded before the probe kept them: score the saved final model once
        final[TARGET_LOGPS] = _final_target_logps(setup, setup.work / "rate" / f"{method}-n{n}")
    best = min(record["history"][1:], key=lambda h: h["heldout_objective"])
    moved = paired_kl_difference(final, setup.rows["pi0 (start)"])
    return {**record, "epochs": final["epoch"], "learning_rate": lr,
            "kl_target_to_policy": final["kl_target_to_policy"],
            "kl_target_to_policy_stderr": final["kl_target_to_policy_stderr"],
            "moved_from_pi0": moved[0], "moved_from_pi0_stderr": moved[1],
            "target_objective": objective_at_target(rows[:record["objective_pairs"]], method, setup.cfg.gamma),
            "target_heldout_objective": objective_at_target(heldout, method, setup.cfg.gamma),
            "best_heldout_epoch": best["epoch"], "kl_at_best_heldout": best["kl_target_to_policy"]}


def _final_target_logps(setup: Setup, run_dir: Path) -> list[float]:
    """log pi_n of the test prompts' pi* samples for a rate point's saved final/ model, cached beside it."""
    final = str(run_dir / "final")
    return _stamped(run_dir / "final_target_logps.json", final, lambda: {
        TARGET_LOGPS: _policy_target_logps(setup.world, setup.shared, final).tolist()})[TARGET_LOGPS]


def run_rate(setup: Setup) -> dict:
    """PMLE and DPO at each n of the plan, the smallest n first (both methods per n)."""
    pair_files, setup.data_summary["labels_rate_pool"], rows = rate_pairs(setup.world, setup.cfg, setup.plan,
                                                                         setup.work)
    heldout = heldout_pairs(setup.world, setup.cfg, setup.plan, setup.work)
    results = {m: {} for m in RATE}
    with Stage(setup.work, "rate (pmle, dpo to convergence)", len(RATE) * len(pair_files)) as bar:
        for n in sorted(pair_files):
            for method in RATE:
                bar.set_postfix_str(f"{method} n={n}")
                results[method][n] = rate_run(setup, heldout, method, n, rows)
                bar.update(1)
    return results


def reference_rows(world, shared: EvalSet, cfg: RealLMConfig, work: Path) -> dict:
    """The pi0 and pi* rows (cached)."""
    with Stage(work, "reference rows (pi0, pi*)", 2) as bar:
        rows = {"pi0 (start)": evaluate_row(world, shared, work / "evals" / "pi0.json", cfg.seed + 90, None)}
        bar.update(1)
        target_path = work / "evals" / "pi-star.json"
        if not target_path.is_file():
            write_text_atomic(target_path, json.dumps(evaluate_target(world, shared, cfg.seed + 91)))
        rows["pi* (target)"] = {TARGET_LOGPS: shared.target_star.tolist(), **json.loads(target_path.read_text())}
        bar.update(1)
    return rows


def run(out_dir: Path, quick: bool = False, seed: int = 0, config: RealLMConfig | None = None) -> dict:
    cfg = config or load_config(RealLMConfig, None, [f"quick={str(quick).lower()}", f"seed={seed}"])
    out, began = Path(out_dir), time.perf_counter()
    setup = prepare(out, cfg)
    calibration = calibration_seconds(setup.world.model)
    work = setup.work

    def results(rate: dict) -> dict:
        timings = json.loads((work / "timings.json").read_text())
        selected = json.loads((work / "selected.json").read_text()) if (work / "selected.json").is_file() else {}
        return {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "plan": setup.plan,
                "world": setup.world.describe(), "precision": PRECISION.__dict__, "data": setup.data_summary,
                "rows": setup.rows, "rate": rate, "selected": selected, "reward_model_accuracy": setup.rm_accuracy,
                "timings": timings, "memory": json.loads((work / "memory.json").read_text()),
                "seconds": sum(timings.values()), "seconds_this_invocation": time.perf_counter() - began,
                "calibration_seconds": calibration, "calibration_seconds_quiet": QUIET_CALIBRATION}

    from .real_lm_report import write_outputs
    setup.rows.update(run_methods(setup, on_row=lambda done: write_outputs(
        out, results({}) | {"rows": {**setup.rows, **done}})))
    final = results(run_rate(setup) if cfg.rate else {})
    write_outputs(out, final)
    return final
