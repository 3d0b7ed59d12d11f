"""`evaluate(config)`: the whole evaluation of one or more policies, as `distalign eval --config` runs it.

The config is an `EvalConfig` (`evaluation.config`; `distalign eval --help` lists its keys) or a
mapping of the same keys, validated on entry. Samples from each policy, then reports KL(pi||pi_ref) on
the policy's own samples, reward-model score and win-rate, LLM-judge win-rate and MT-Bench grades,
reward-model accuracy on held-out pairs, and lm-evaluation-harness scores.
Returns {"results": {policy: {metric: ...}}, "reward_model_accuracy": ..., "judge_error": ..., "paths": ...}.
A judge that fails (endpoint down, retries exhausted) does not discard the rest: its cells read
"failed", the other metrics are written, and `judge_error` holds the one-line reason.
`prob_a_beats_b` (a Python callable, for the testbed) adds the exact oracle win-rate.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from distalign.data import ChatFormat, prepare_tokenizer
from distalign.models import load_policy, load_reward_model, load_tokenizer

from .harness import run_lm_eval
from distalign.config import build_dataclass, to_dict

from .config import EvalConfig
from .judge import JudgeClient, JudgeError
from .metrics import (
    kl_to_reference,
    mean_stderr,
    response_logps,
    reward_scores,
    rm_accuracy,
    sample_responses,
)
from .mtbench import grade_single
from .report import write_report
from .winrate import judge_winrate, oracle_winrate, winrate_from_rewards

def read_rows(path: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSONL or JSON-list file; a missing / non-string field names the file, row and field."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: file not found")
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.endswith(".json") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON{'' if path.endswith('.json') else ' lines'} ({error})") from None
    for number, row in enumerate(rows, start=1):
        for name in fields + tuple(f for f in optional if isinstance(row, dict) and f in row):
            if not isinstance(row, dict) or not isinstance(row.get(name), str) or not row[name].strip():
                raise ValueError(f"{path}: row {number}: field '{name}': expected a non-empty string")
    return rows


def _policies(config: EvalConfig) -> dict[str, str]:
    policies = config.policies
    if isinstance(policies, Mapping):
        return {str(name): str(path) for name, path in policies.items()}
    return {Path(str(path)).name or str(path): str(path) for path in policies}


def _load_causal_lm(path: str, device: str):
    """A policy folder (full weights, or a LoRA adapter put back on its recorded base)."""
    return load_policy(path, dtype="float32").to(device).eval()


def _write_samples(path: Path, prompts: list[str], texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"prompt": prompt, "response": text}, ensure_ascii=False) + "\n" for prompt, text in zip(prompts, texts))


@dataclass
class _Context:
    """What every policy is evaluated against; built once by `evaluate`."""

    prompts: list[str]
    tokenizer: object
    generation: dict
    chat: ChatFormat
    out_dir: Path
    device: str
    reference_model: object = None
    baseline: list[str] | None = None          # the responses to win against
    reward_fn: Callable | None = None           # (prompts, responses) -> rewards
    baseline_rewards: list[float] | None = None
    judge: JudgeClient | None = None
    judge_error: str | None = None              # the first judge failure; later judge cells read "failed"
    mtbench: bool = False
    oracle: Callable | None = None
    harness: dict = field(default_factory=dict)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


def _sample_and_kl(ctx: _Context, name: str, path: str) -> tuple[list[str], dict]:
    """Sample from the policy, save the samples, and KL(pi||pi0) on them when a reference is set."""
    model = _load_causal_lm(path, ctx.device)
    samples = sample_responses(model, ctx.tokenizer, ctx.prompts, **ctx.generation, chat=ctx.chat)
    _write_samples(ctx.out_dir / "samples" / f"{name}.jsonl", ctx.prompts, samples.texts)
    row: dict = {"n_without_eos": samples.n_without_eos}
    if ctx.reference_model is not None:
        batch = ctx.generation["batch_size"]
        policy_logps = response_logps(model, samples.prompts_ids, samples.responses_ids, ctx.pad_token_id, batch)
        ref_logps = response_logps(ctx.reference_model, samples.prompts_ids, samples.responses_ids,
                                   ctx.pad_token_id, batch)
        row["kl"] = kl_to_reference(policy_logps, ref_logps)
    return samples.texts, row


def _evaluate_policy(ctx: _Context, name: str, path: str) -> dict:
    texts, row = _sample_and_kl(ctx, name, path)
    if ctx.reward_fn is not None:
        rewards = ctx.reward_fn(ctx.prompts, texts)
        mean, stderr = mean_stderr(rewards)
        row["rm_score"] = {"mean": mean, "stderr": stderr, "n": len(rewards)}
        if ctx.baseline_rewards is not None:
            row["rm_win_rate"] = winrate_from_rewards(rewards, ctx.baseline_rewards).to_dict()
    if ctx.baseline is not None and ctx.oracle is not None:
        row["oracle_win_rate"] = oracle_winrate(ctx.prompts, texts, ctx.baseline, ctx.oracle).to_dict()
    if ctx.baseline is not None and ctx.judge is not None:
        row["judge_win_rate"] = _ask_judge(ctx, lambda: judge_winrate(ctx.prompts, texts, ctx.baseline,
                                                                      ctx.judge).to_dict())
    if ctx.mtbench:
        row["mtbench"] = _ask_judge(ctx, lambda: grade_single(ctx.judge, ctx.prompts, texts).summary())
    if ctx.harness.get("tasks"):
        scores = run_lm_eval(path, **ctx.harness, device=ctx.device)
        row.update({f"{task}/{metric}": value for task, metrics in scores.items()
                    for metric, value in metrics.items()})
    return row


def _ask_judge(ctx: _Context, ask: Callable[[], dict]) -> dict | str:
    """The judge's result, or "failed" once the judge has failed (the first failure is kept in ctx)."""
    if ctx.judge_error is None:
        try:
            return ask()
        except JudgeError as error:
            ctx.judge_error = str(error)
    return "failed"


def _reward_setup(config: EvalConfig, ctx: _Context, pairs: list[dict] | None) -> dict | None:
    """Load the reward model into ctx; RM accuracy on held-out pairs when `pairs` is given."""
    from functools import partial

    model = load_reward_model(config.reward_model, dtype="float32").to(ctx.device).eval()
    ctx.reward_fn = partial(reward_scores, model, ctx.tokenizer, batch_size=ctx.generation["batch_size"],
                            chat=ctx.chat)
    if not pairs:
        return None
    prompts = [row["prompt"] for row in pairs]
    return rm_accuracy(ctx.reward_fn(prompts, [row["chosen"] for row in pairs]),
                       ctx.reward_fn(prompts, [row["rejected"] for row in pairs]))


def _baseline(config: EvalConfig, ctx: _Context, rows: list[dict]) -> list[str] | None:
    """Reference responses from the prompts file, else samples of the reference model, else None."""
    field_name = config.reference_field
    if rows and all(field_name in row for row in rows):
        return [row[field_name] for row in rows]
    if ctx.reference_model is None:
        return None
    samples = sample_responses(ctx.reference_model, ctx.tokenizer, ctx.prompts, **ctx.generation, chat=ctx.chat)
    _write_samples(ctx.out_dir / "samples" / "reference.jsonl", ctx.prompts, samples.texts)
    return samples.texts


def evaluate(config: EvalConfig | Mapping,
             prob_a_beats_b: Callable[[str, str, str], float] | None = None) -> dict:
    """Evaluate every policy in `config` (see `EvalConfig`); writes eval.json / eval.md.

    Everything that can fail without a model (the config, the data files, the judge's API key) is
    checked before the first model loads.
    """
    if not isinstance(config, EvalConfig):
        config = build_dataclass(EvalConfig, dict(config), "eval config")
    policies = _policies(config)
    rows = read_rows(config.prompts, (config.prompt_field,), (config.reference_field,))
    rows = rows[:config.max_prompts] if config.max_prompts else rows
    pairs = read_rows(config.pairs, ("prompt", "chosen", "rejected")) if config.pairs else None
    out_dir = Path(config.output_dir)
    judge = None
    if config.judge is not None:
        config.judge.check_key()
        cache = config.judge.cache_path or str(out_dir / "judge_cache.jsonl")
        judge = JudgeClient(replace(config.judge, cache_path=cache))
    chat = ChatFormat(config.chat_template, config.system)
    tokenizer = prepare_tokenizer(load_tokenizer(config.tokenizer or config.reference
                                                 or next(iter(policies.values()))), chat)
    ctx = _Context(prompts=[row[config.prompt_field] for row in rows], tokenizer=tokenizer, chat=chat,
                   generation=asdict(config.generation), out_dir=out_dir, device=config.device,
                   judge=judge, mtbench=config.mtbench, oracle=prob_a_beats_b, harness=asdict(config.harness))
    if config.reference:
        ctx.reference_model = _load_causal_lm(config.reference, config.device)
    ctx.baseline = _baseline(config, ctx, rows)
    rm_acc = _reward_setup(config, ctx, pairs) if config.reward_model else None
    if ctx.reward_fn is not None and ctx.baseline is not None:
        ctx.baseline_rewards = ctx.reward_fn(ctx.prompts, ctx.baseline)
    results = {name: _evaluate_policy(ctx, name, path) for name, path in policies.items()}
    extra = {"reward_model_accuracy": rm_acc, "n_prompts": len(ctx.prompts),
             "judge_requests": ctx.judge.requests_sent if ctx.judge else 0,
             "judge_error": ctx.judge_error, "config": to_dict(config)}
    json_path, md_path = write_report(results, out_dir, name="eval", extra=extra)
    return {"results": results, **extra, "paths": {"json": str(json_path), "markdown": str(md_path)}}
