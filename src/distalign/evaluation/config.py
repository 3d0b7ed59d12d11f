"""`EvalConfig`: the schema of `distalign eval --config` (every key typed, range-checked at load).

    distalign eval --config configs/eval.yaml max_prompts=16 generation.temperature=0.7
    evaluate(load_config(EvalConfig, "configs/eval.yaml"))
"""
from __future__ import annotations

from dataclasses import dataclass

from distalign.config import schema_field as _f
from distalign.config.schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, check_chat_fields
from distalign.data import CHAT_MODES

from .judge import JudgeConfig


@dataclass
class EvalGeneration:
    max_new_tokens: int = _f(128, "longest sampled response (tokens)", range=AT_LEAST_ONE)
    temperature: float = _f(1.0, "sampling temperature of every policy and the reference", range=POSITIVE)
    seed: int = _f(0, "sampling seed (each policy samples with the same draws)", range=SEED)
    batch_size: int = _f(8, "prompts per sampling / scoring batch", range=AT_LEAST_ONE)


@dataclass
class HarnessSettings:
    tasks: list[str] = _f(help="lm-evaluation-harness task names (empty: no harness run)", factory=list)
    include_path: str | None = _f(None, "folder of your own task YAML files")
    limit: float | None = _f(None, "examples per task (a smoke run; scores then not comparable)", range=POSITIVE)
    num_fewshot: int | None = _f(None, "few-shot examples (default: the task's)", range=NON_NEGATIVE)
    batch_size: int = _f(1, "harness batch size", range=AT_LEAST_ONE)


@dataclass
class EvalConfig:
    policies: dict[str, str] | list[str] = _f(help="required: {name: checkpoint folder or Hub id}, or a list of "
                                                   "paths (named by folder)", factory=dict)
    reference: str | None = _f(None, "pi0 checkpoint: KL(pi||pi0) on the policy's own samples, and the "
                                     "win-rate opponent when the prompts have no reference responses")
    tokenizer: str | None = _f(None, "tokenizer path/id; default: the reference, else the first policy")
    prompts: str = _f("", "required: JSONL / JSON file with a `prompt_field` per row (and optionally "
                          "a `reference_field`, a reference response to win against)")
    prompt_field: str = _f("prompt", "the prompts file's prompt column")
    reference_field: str = _f("reference", "the prompts file's reference-response column")
    max_prompts: int | None = _f(None, "evaluate only the first N prompts (default: all)", range=AT_LEAST_ONE)
    chat_template: str = _f("auto", "prompts through the tokenizer's chat template, as data.chat_template in "
                                    "training: auto (when it has one), always, never", choices=CHAT_MODES)
    system: str | None = _f(None, "system prompt before every prompt (needs the chat template), as data.system")
    generation: EvalGeneration = _f(help="sampling", factory=EvalGeneration)
    reward_model: str | None = _f(None, "AutoModelForSequenceClassification folder: RM score and RM win-rate")
    pairs: str | None = _f(None, "held-out preference pairs (prompt, chosen, rejected) for RM accuracy")
    judge: JudgeConfig | None = _f(None, "pairwise LLM-judge win-rate (both orders) over an OpenAI-compatible "
                                         "endpoint")
    mtbench: bool = _f(False, "also grade each policy's responses 1-10 with the judge")
    harness: HarnessSettings = _f(help="lm-evaluation-harness run per policy (the alignment tax)",
                                  factory=HarnessSettings)
    device: str = _f("cpu", "cpu, cuda, cuda:1, ...")
    output_dir: str = _f("", "required: gets eval.json, eval.md, samples/{name}.jsonl, judge_cache.jsonl")

    def validate(self):
        for key in ("policies", "prompts", "output_dir"):
            if not getattr(self, key):
                raise ValueError(key, "required but missing")
        if self.mtbench and self.judge is None:
            raise ValueError("mtbench", "needs a judge section (the judge grades the responses)")
        if self.pairs and not self.reward_model:
            raise ValueError("pairs", "needs reward_model (RM accuracy is measured on the pairs)")
        check_chat_fields(self)
