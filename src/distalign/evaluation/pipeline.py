"""`evaluate(config)`: the whole evaluation of one or more policies, as `distalign eval --config` runs it.

Config keys (a mapping; unknown keys are errors naming the key):
  policies        required; {name: checkpoint folder or Hub id} (or a list of paths, named by folder)
  reference       pi0 checkpoint; gives KL(pi||pi0) on the policy's own samples, and when the prompts
                  file has no reference responses, the reference's samples are the win-rate opponent
  tokenizer       tokenizer path/id; default: the reference, else the first policy
  prompts         required; JSONL / JSON file with a `prompt_field` per row and optionally a
                  `reference_field` (a reference response to win against)
  prompt_field, reference_field   default "prompt", "reference"
  max_prompts     evaluate only the first N prompts (default: all)
  generation      {max_new_tokens: 128, temperature: 1.0, seed: 0, batch_size: 8}
  reward_model    AutoModelForSequenceClassification folder: RM score and RM win-rate
  pairs           held-out preference pairs (prompt, chosen, rejected) for RM accuracy
  judge           `JudgeConfig` mapping: pairwise LLM-judge win-rate (both orders)
  mtbench         true: also grade each policy's responses 1-10 with the judge
  harness         {tasks: [...], include_path, limit, num_fewshot, batch_size}: lm-evaluation-harness
  device          "cpu" (default), "cuda", ...
  output_dir      required; gets eval.json, eval.md, samples/{name}.jsonl, judge_cache.jsonl
Returns {"results": {policy: {metric: ...}}, "reward_model_accuracy": ..., "paths": ...}.
`prob_a_beats_b` (a Python callable, for the testbed) adds the exact oracle win-rate.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from distalign.models import load_policy, load_reward_model, load_tokenizer

from .harness import run_lm_eval
from .judge import JudgeClient, JudgeConfig
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

KNOWN_KEYS = {"policies", "reference", "tokenizer", "prompts", "prompt_field", "reference_field",
              "max_prompts", "generation", "reward_model", "pairs", "judge", "mtbench", "harness",
              "device", "output_dir"}
GENERATION_DEFAULTS = {"max_new_tokens": 128, "temperature": 1.0, "seed": 0, "batch_size": 8}


def read_rows(path: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSONL or JSON-list file; a missing / non-string field names the file, row and field."""
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


def _validate(config: Mapping) -> None:
    for key in config:
        if key not in KNOWN_KEYS:
            raise ValueError(f"eval.{key}: unknown key (expected one of {sorted(KNOWN_KEYS)})")
    for key in ("policies", "prompts", "output_dir"):
        if not config.get(key):
            raise ValueError(f"eval.{key}: required but missing")
    for key in config.get("generation") or {}:
        if key not in GENERATION_DEFAULTS:
            raise ValueError(f"eval.generation.{key}: unknown key (expected one of {sorted(GENERATION_DEFAULTS)})")
    if config.get("mtbench") and not config.get("judge"):
        raise ValueError("eval.mtbench: needs eval.judge (the judge grades the responses)")
    if config.get("pairs") and not config.get("reward_model"):
        raise ValueError("eval.pairs: needs eval.reward_model (RM accuracy is measured on the pairs)")


def _policies(config: Mapping) -> dict[str, str]:
    policies = config["policies"]
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
    out_dir: Path
    device: str
    reference_model: object = None
    baseline: list[str] | None = None          # the responses to win against
    reward_fn: Callable | None = None           # (prompts, responses) -> rewards
    baseline_rewards: list[float] | None = None
    judge: JudgeClient | None = None
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
    samples = sample_responses(model, ctx.tokenizer, ctx.prompts, **ctx.generation)
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
        row["judge_win_rate"] = judge_winrate(ctx.prompts, texts, ctx.baseline, ctx.judge).to_dict()
    if ctx.mtbench:
        row["mtbench"] = grade_single(ctx.judge, ctx.prompts, texts).summary()
    if ctx.harness.get("tasks"):
        scores = run_lm_eval(path, **ctx.harness, device=ctx.device)
        row.update({f"{task}/{metric}": value for task, metrics in scores.items()
                    for metric, value in metrics.items()})
    return row


def _reward_setup(config: Mapping, ctx: _Context) -> dict | None:
    """Load the reward model into ctx; RM accuracy on held-out pairs when `pairs` is given."""
    from functools import partial

    model = load_reward_model(config["reward_model"], dtype="float32").to(ctx.device).eval()
    ctx.reward_fn = partial(reward_scores, model, ctx.tokenizer, batch_size=ctx.generation["batch_size"])
    if not config.get("pairs"):
        return None
    pairs = read_rows(config["pairs"], ("prompt", "chosen", "rejected"))
    prompts = [row["prompt"] for row in pairs]
    return rm_accuracy(ctx.reward_fn(prompts, [row["chosen"] for row in pairs]),
                       ctx.reward_fn(prompts, [row["rejected"] for row in pairs]))


def _baseline(config: Mapping, ctx: _Context, rows: list[dict]) -> list[str] | None:
    """Reference responses from the prompts file, else samples of the reference model, else None."""
    field_name = config.get("reference_field", "reference")
    if rows and all(field_name in row for row in rows):
        return [row[field_name] for row in rows]
    if ctx.reference_model is None:
        return None
    samples = sample_responses(ctx.reference_model, ctx.tokenizer, ctx.prompts, **ctx.generation)
    _write_samples(ctx.out_dir / "samples" / "reference.jsonl", ctx.prompts, samples.texts)
    return samples.texts


def evaluate(config: Mapping, prob_a_beats_b: Callable[[str, str, str], float] | None = None) -> dict:
    """Evaluate every policy in `config` (keys in the module docstring); writes eval.json / eval.md."""
    _validate(config)
    policies = _policies(config)
    prompt_field = config.get("prompt_field", "prompt")
    rows = read_rows(config["prompts"], (prompt_field,), (config.get("reference_field", "reference"),))
    rows = rows[:config["max_prompts"]] if config.get("max_prompts") else rows
    out_dir = Path(config["output_dir"])
    device = config.get("device", "cpu")
    tokenizer = load_tokenizer(config.get("tokenizer") or config.get("reference") or next(iter(policies.values())))
    ctx = _Context(prompts=[row[prompt_field] for row in rows], tokenizer=tokenizer,
                   generation={**GENERATION_DEFAULTS, **(config.get("generation") or {})},
                   out_dir=out_dir, device=device, mtbench=bool(config.get("mtbench")),
                   oracle=prob_a_beats_b, harness=dict(config.get("harness") or {}))
    if config.get("reference"):
        ctx.reference_model = _load_causal_lm(config["reference"], device)
    if config.get("judge"):
        judge = {"cache_path": str(out_dir / "judge_cache.jsonl"), **config["judge"]}
        ctx.judge = JudgeClient(JudgeConfig.from_dict(judge, where="eval.judge"))
    ctx.baseline = _baseline(config, ctx, rows)
    rm_acc = _reward_setup(config, ctx) if config.get("reward_model") else None
    if ctx.reward_fn is not None and ctx.baseline is not None:
        ctx.baseline_rewards = ctx.reward_fn(ctx.prompts, ctx.baseline)
    results = {name: _evaluate_policy(ctx, name, path) for name, path in policies.items()}
    extra = {"reward_model_accuracy": rm_acc, "n_prompts": len(ctx.prompts),
             "judge_requests": ctx.judge.requests_sent if ctx.judge else 0,
             "config": {key: value for key, value in config.items()}}
    json_path, md_path = write_report(results, out_dir, name="eval", extra=extra)
    return {"results": results, **extra, "paths": {"json": str(json_path), "markdown": str(md_path)}}
