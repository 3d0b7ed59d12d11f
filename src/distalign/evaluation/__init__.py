"""Evaluation: win-rate (oracle, reward model, LLM judge in both orders), KL to the reference,
reward-model score and accuracy, MT-Bench-style grading, lm-evaluation-harness, reports.

`evaluate(config) -> dict` is the entry point of `distalign eval --config`; its config is an
`EvalConfig` (`evaluation.config`, every key typed and range-checked; `distalign eval --help` lists
them): policies, reference, tokenizer, prompts, prompt_field, reference_field, max_prompts,
generation, reward_model, pairs, judge (`JudgeConfig`), mtbench, harness, device, output_dir.

Never imports distalign.training or distalign.cli.
"""
from .config import EvalConfig, EvalGeneration, HarnessSettings
from .harness import alignment_tax, hflm_model_args, require_lm_eval, run_lm_eval, summarize_results
from .judge import JudgeClient, JudgeConfig, JudgeError, combine_orders, judge_pairs, parse_pairwise_verdict
from .metrics import (
                      Samples,
                      kl_to_reference,
                      mean_stderr,
                      response_logps,
                      reward_scores,
                      rm_accuracy,
                      sample_responses,
)
from .mtbench import SingleGrades, grade_single, parse_rating
from .pipeline import evaluate, read_rows
from .report import format_cell, markdown_table, write_report
from .winrate import (
                      WinRate,
                      judge_winrate,
                      oracle_winrate,
                      reward_winrate,
                      winrate_from_outcomes,
                      winrate_from_rewards,
                      winrate_from_scores,
)

__all__ = [
                      "EvalConfig",
                      "EvalGeneration",
                      "HarnessSettings",
                      "JudgeClient",
                      "JudgeConfig",
                      "JudgeError",
                      "Samples",
                      "SingleGrades",
                      "WinRate",
                      "alignment_tax",
                      "combine_orders",
                      "evaluate",
                      "format_cell",
                      "grade_single",
                      "hflm_model_args",
                      "judge_pairs",
                      "judge_winrate",
                      "kl_to_reference",
                      "markdown_table",
                      "mean_stderr",
                      "oracle_winrate",
                      "parse_pairwise_verdict",
                      "parse_rating",
                      "read_rows",
                      "require_lm_eval",
                      "response_logps",
                      "reward_scores",
                      "reward_winrate",
                      "rm_accuracy",
                      "run_lm_eval",
                      "sample_responses",
                      "summarize_results",
                      "winrate_from_outcomes",
                      "winrate_from_rewards",
                      "winrate_from_scores",
                      "write_report",
]
