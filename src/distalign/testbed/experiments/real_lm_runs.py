"""Training runs of `testbed real-lm`: one `MethodSpec` -> key=value overrides -> the library's trainer.

    folder = train_method(spec, ctx, learning_rate=3e-4, out=work / "runs" / "dpo")   # final/ (LoRA adapter)
    folder, history = train_to_convergence("pmle", ctx, pairs_file, n, out)            # the rate's stopping rule

The configs are built from overrides exactly as `distalign train <method> key=value ...` builds them,
and run by `train_offline` / `train_online` / `train_online_pairwise`; the only thing done here
that the CLI does not do is the rate experiment's stopping rule, which steps `OfflineTrainer` one
epoch at a time and evaluates its empirical objective in between (`OfflineTrainer.evaluate` on the
training pairs themselves, `data.eval`).
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distalign.config import OfflineConfig, load_config
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.data.files import write_text_atomic
from distalign.models import evaluating, save_model
from distalign.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from distalign.training.offline import OfflineTrainer, train_offline
from distalign.training.online import train_online
from distalign.training.online_pairwise import train_online_pairwise

from ..real_lm import PRECISION
from .lm_common import quiet
from .real_lm_methods import OFFLINE, ONLINE, MethodSpec

LORA = ("model.lora.r=16", "model.lora.alpha=32")
# Tokens one training forward may hold: ~2 GB of fp32 activations at SmolLM2's ~2.6 MB a token, so a run
# (experiment world + policy + reward model + activations) stays under ~5 GB.
TOKENS_PER_FORWARD = 768


def release_memory() -> None:
    """Free what the last run left: its trainer's reference cycles (gc) and the heap pages glibc keeps
    (`malloc_trim`). The trainers fix glibc's trim threshold at 1 GB for step speed
    (`training.common.retain_freed_memory`); an experiment that runs dozens of trainings and evaluations
    in one process would otherwise keep each one's freed memory and fragments (it reached 10 GB)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):    # not glibc: nothing to trim
        pass


def memory_mb() -> dict:
    """This process's resident memory now and its peak since the last `reset_peak_memory` (Linux's VmRSS
    and VmHWM), in MB; elsewhere only the lifetime peak."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"rss_mb": int(status["VmRSS"].split()[0]) // 1024, "peak_rss_mb": int(status["VmHWM"].split()[0]) // 1024}
    except (OSError, KeyError, ValueError):
        return {"rss_mb": None, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def reset_peak_memory() -> None:
    """Start a new peak for `memory_mb` (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
ORACLE = "distalign.testbed.real_lm_data:oracle_reward"


@dataclass
class RunContext:
    """What every run of one experiment shares: the model, the files, the sizes, the seed."""
    model_dir: str
    files: dict              # "pairs" | "rm_pairs" | "demos" | "prompts" -> path
    n_pairs: int
    max_new_tokens: int
    batch_size: int          # pairs / demonstrations per step (offline); prompt draws x k <= 2 x this (online)
    epochs: float            # passes over the n pairs / demonstrations (offline)
    seed: int
    oracle: dict             # kwargs of the oracle reward (model_dir, system_prompt, max_new_tokens, gamma)
    reward_model: str | None = None
    progress_bar: bool = True
    prompt_tokens: int = 64  # the longest chat-rendered training prompt (sizes the micro-batches)

    def split(self, examples: int, tokens_per_example: int) -> list[str]:
        """train.batch_size / gradient_accumulation_steps for `examples` per optimizer step, in micro-batches
        of at most `TOKENS_PER_FORWARD` tokens (the smallest divisor of `examples` that fits): the same
        optimizer step, with activation memory bounded (SmolLM2 keeps ~2.6 MB per trained token in fp32)."""
        accumulation = next(a for a in range(1, examples + 1)
                            if examples % a == 0 and examples // a * tokens_per_example <= TOKENS_PER_FORWARD
                            or a == examples)
        return [f"train.batch_size={examples // accumulation}", f"train.gradient_accumulation_steps={accumulation}"]

    def lengths(self, responses_in_data: bool = True) -> list[str]:
        """Length limits no prompt or response here reaches; data.max_length only for methods whose data
        hold responses (online methods' data are prompts: the config refuses it there)."""
        return ["data.max_prompt_length=192"] + ([f"data.max_length={192 + self.max_new_tokens}"]
                                                  if responses_in_data else [])


def _schedule(steps: int, learning_rate: float, out: Path, ctx: RunContext) -> list[str]:
    return [f"train.output_dir={out}", f"train.max_steps={steps}", f"train.seed={ctx.seed}",
            f"train.log_every={max(1, steps // 20)}", f"train.save_every={max(1, steps // 4)}",
            "train.keep_checkpoints=1", _continue(out), f"train.progress_bar={str(ctx.progress_bar).lower()}",
            *_precision(), f"optim.learning_rate={learning_rate}", f"optim.warmup_steps={max(1, steps // 10)}",
            "optim.schedule=linear"]


def _continue(out: Path) -> str:
    """Resume the row's last checkpoint if it has one, else start it afresh (a run stopped before its
    first checkpoint leaves a folder that a plain run would refuse as not empty)."""
    return "train.resume=true" if latest_checkpoint(out) is not None else "train.overwrite=true"


def _precision() -> list[str]:
    """train.mixed_precision from the world's one precision switch (the config loader reads YAML's
    boolean `no` as "no")."""
    return [f"train.mixed_precision={PRECISION.train_mixed_precision}"]


def _rewards(spec: MethodSpec, ctx: RunContext) -> list[str]:
    if spec.reward is None:
        return []
    if spec.reward == "rm":
        if ctx.reward_model is None:
            raise ValueError(f"{spec.name}: needs the reward model, which has not been trained")
        source = {"kind": "model", "path": ctx.reward_model, "kwargs": {"batch_size": 32}}
    else:
        source = {"kind": "callable", "path": ORACLE, "kwargs": ctx.oracle}
    return [f"rewards={json.dumps([source])}"]


def offline_steps(ctx: RunContext, n: int | None = None) -> int:
    return max(1, math.ceil(ctx.epochs * (n or ctx.n_pairs) / ctx.batch_size))


def online_shape(spec: MethodSpec, ctx: RunContext) -> tuple[int, int]:
    """(prompts per step, steps): 2 n fresh samples in all, k per prompt draw, at most 2 x batch rows a step."""
    k = spec.samples_per_prompt
    prompts = max(1, 2 * ctx.batch_size // k)
    return prompts, max(1, math.ceil(2 * ctx.n_pairs / (k * prompts)))


def overrides_for(spec: MethodSpec, ctx: RunContext, learning_rate: float, out: Path) -> list[str]:
    """The full key=value list of one run (what `distalign train` would be given)."""
    with_responses = spec.family == OFFLINE or spec.method == "pmle_online"
    base = [f"method={spec.method}", f"model.name_or_path={ctx.model_dir}", *LORA, *ctx.lengths(with_responses),
            *spec.settings]
    if spec.family == OFFLINE:
        data = ctx.files[spec.data]
        extra = ["precompute_reference=true"] if spec.method in ("dpo", "cpo") else []
        row_tokens = ctx.prompt_tokens + ctx.max_new_tokens * (1 if spec.method == "sft" else 2)
        return [*base, f"data.train={data}", *ctx.split(ctx.batch_size, row_tokens), *extra,
                *_schedule(offline_steps(ctx), learning_rate, out, ctx)]
    generation = [f"generation.max_new_tokens={ctx.max_new_tokens}", "generation.temperature=1.0",
                  f"generation.num_samples={spec.samples_per_prompt}"]
    if spec.method == "pmle_online":      # dataset pairs + fresh samples at their prompts for the KL term
        return [*base, f"pairs={ctx.files['pairs']}", f"train.batch_size={ctx.batch_size}", *generation,
                *_checkpointing(ctx, ctx.batch_size * (2 + spec.samples_per_prompt)),
                *_schedule(offline_steps(ctx), learning_rate, out, ctx)]
    prompts, steps = online_shape(spec, ctx)
    if spec.family == ONLINE:       # the update's micro-batches: whole groups, same optimizer step
        accumulation = int(ctx.split(prompts, spec.samples_per_prompt * (ctx.prompt_tokens + ctx.max_new_tokens))[1]
                           .split("=")[1])
        memory = [f"train.gradient_accumulation_steps={accumulation}"] if accumulation > 1 else []
    else:                           # the online pairwise loops take one batch per step: recompute instead
        memory = _checkpointing(ctx, prompts * spec.samples_per_prompt)
    return [*base, f"data.train={ctx.files['prompts']}", f"train.batch_size={prompts}", *generation, *memory,
            *_rewards(spec, ctx), *_schedule(steps, learning_rate, out, ctx)]


def _checkpointing(ctx: RunContext, rows: int) -> list[str]:
    """Gradient checkpointing for a loop that trains on `rows` responses in one forward when they hold more
    than `TOKENS_PER_FORWARD` tokens (same numbers, one more forward, activations of one layer at a time)."""
    return ["train.gradient_checkpointing=true"] if rows * (ctx.prompt_tokens + ctx.max_new_tokens) > \
        TOKENS_PER_FORWARD else []


def train_method(spec: MethodSpec, ctx: RunContext, learning_rate: float, out: Path) -> Path:
    """Run one method to its end (resuming a checkpoint left by an interrupted run); returns final/."""
    out = Path(out)
    if (out / "final" / "adapter_config.json").is_file():
        return out / "final"
    overrides = overrides_for(spec, ctx, learning_rate, out)
    schema, train = {OFFLINE: (OfflineConfig, train_offline), ONLINE: (OnlineConfig, train_online)}.get(
        spec.family, (OnlinePairwiseConfig, train_online_pairwise))
    cfg = load_config(schema, None, overrides)
    with quiet():
        result = train(cfg, log=lambda *args: None)
    return Path(result["final_model"])


def train_reward_model(ctx: RunContext, learning_rate: float, out: Path, epochs: float) -> Path:
    """The Bradley-Terry reward model (seed 001 Eq. 9): M + a score head, LoRA, on the text-only pairs."""
    out = Path(out)
    if (out / "final" / "adapter_config.json").is_file():
        return out / "final"
    steps = max(1, math.ceil(epochs * ctx.n_pairs / ctx.batch_size))
    overrides = ["method=reward", f"model.name_or_path={ctx.model_dir}", *LORA, *ctx.lengths(),
                 f"data.train={ctx.files['rm_pairs']}",
                 *ctx.split(ctx.batch_size, 2 * (ctx.prompt_tokens + ctx.max_new_tokens)),
                 *_schedule(steps, learning_rate, out, ctx)]
    with quiet():
        return Path(train_offline(load_config(OfflineConfig, None, overrides), log=lambda *a: None)["final_model"])


def train_to_convergence(method: str, settings: tuple[str, ...], ctx: RunContext, pairs_file: Path, n: int,
                         out: Path, learning_rate: float, max_epochs: int, tolerance: float,
                         probe: Callable | None = None, check_file: Path | None = None) -> tuple[Path, dict]:
    """Offline `method` on n pairs until the empirical objective (its mean loss over the training pairs in
    `check_file`, default all n, at the end of an epoch) improves by less than `tolerance` (relative)
    over one epoch, or max_epochs.

    Constant learning rate (a decaying schedule would need the stopping epoch in advance). Batches of
    similar length (`group_by_length`: less padding, same objective). After every epoch `probe(model)`
    adds its numbers (the experiment's held-out objective and exact KL) to the history, so the report
    can show the whole curve, not only where the rule stopped; and a checkpoint plus the history so far
    are saved, so an interrupted run resumes at its last finished epoch. Returns final/ and
    {"history": [{epoch, objective, ...probe}], "converged", "tolerance"}, also in out/convergence.json.
    """
    out = Path(out)
    record, progress = out / "convergence.json", out / "progress.json"
    if record.is_file() and (out / "final" / "adapter_config.json").is_file():
        return out / "final", json.loads(record.read_text())
    steps_per_epoch = max(1, n // ctx.batch_size)
    overrides = [f"method={method}", f"model.name_or_path={ctx.model_dir}", *LORA, *ctx.lengths(), *settings,
                 f"data.train={pairs_file}", f"data.eval={check_file or pairs_file}", "group_by_length=true",
                 *ctx.split(ctx.batch_size, ctx.prompt_tokens + 2 * ctx.max_new_tokens),
                 f"train.output_dir={out}", f"train.max_steps={steps_per_epoch * max_epochs}",
                 f"train.seed={ctx.seed}", "train.progress_bar=false", "train.keep_checkpoints=1", *_precision(),
                 f"optim.learning_rate={learning_rate}", "optim.warmup_steps=0", "optim.schedule=constant"]
    if method in ("dpo", "cpo"):
        overrides.append("precompute_reference=true")
    with quiet():
        trainer = OfflineTrainer(load_config(OfflineConfig, None, overrides), log=lambda *a: None)
        model = trainer.acc.unwrap_model(trainer.model)

        def measure(epoch: int) -> dict:
            entry = {"epoch": epoch, "objective": trainer.evaluate()["eval/loss"]}
            if probe is not None:
                with evaluating(model), torch.no_grad():
                    entry.update(probe(model))
            return entry

        history, converged = _resume(out, progress, trainer, steps_per_epoch) or [measure(0)], False
        for epoch in range(len(history), max_epochs + 1):
            for step in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
                trainer.train_step(step)
            history.append(measure(epoch))
            before, after = history[-2]["objective"], history[-1]["objective"]
            if before - after < tolerance * abs(before):
                converged = True
                break
            if epoch < max_epochs:
                trainer.save(epoch * steps_per_epoch, epoch)
                _write_json(progress, {"history": history})
        save_model(model, trainer.tokenizer, out / "final")
    result = {"history": history, "converged": converged, "tolerance": tolerance,
              "objective_pairs": len(trainer.eval_records)}
    _write_json(record, result)
    progress.unlink(missing_ok=True)
    for checkpoint in list_checkpoints(out):     # only a resume needed them; final/ holds the result
        shutil.rmtree(checkpoint, ignore_errors=True)
    return out / "final", result


def _resume(out: Path, progress: Path, trainer: OfflineTrainer, steps_per_epoch: int) -> list[dict] | None:
    """The history of an interrupted `train_to_convergence`, with the trainer restored to the checkpoint of
    its last finished epoch; None when there is nothing to resume (or the two do not belong together)."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None or not progress.is_file():
        return None
    history = json.loads(progress.read_text())["history"]
    state = load_checkpoint(checkpoint, trainer.acc.unwrap_model(trainer.model), trainer.optimizer, trainer.scheduler)
    if state["step"] != (len(history) - 1) * steps_per_epoch:
        raise ValueError(f"{out}: checkpoint at step {state['step']} does not match the {len(history) - 1} "
                         f"epoch(s) in {progress.name}; remove the folder to restart this rate point")
    return history


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data))
