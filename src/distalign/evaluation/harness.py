"""The alignment-tax check through EleutherAI's lm-evaluation-harness (optional extra `distalign[eval]`).

Seed 001 Section 6 / Table 3 measures the alignment tax as the change in academic-benchmark scores
(MMLU, GSM8K, ARC-challenge, Winogrande, TruthfulQA, HellaSwag) between the reference model and the
aligned one. `run_lm_eval` runs any harness task on one of our saved checkpoints (a full model
folder, or a PEFT adapter folder on top of its base model); `alignment_tax` subtracts the reference
row. Tasks of your own (for example over a local JSONL file) are YAML files in `include_path`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

_INSTALL_HINT = ("lm-evaluation-harness is not installed; it is an optional extra: "
                 "pip install 'distalign[eval]' (or pip install lm-eval)")


def require_lm_eval():
    """Import lm_eval or fail with a one-line install hint."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (fails on a broken install, not later)
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from None
    return lm_eval


def hflm_model_args(checkpoint: str | os.PathLike, dtype: str = "float32",
                    trust_remote_code: bool = False) -> dict:
    """HFLM arguments for a checkpoint folder: `pretrained=path`, or for a PEFT adapter folder
    `pretrained=<its base model>, peft=path` (the adapter's own config names the base); a `.gguf` file (as
    policy or as an adapter's base) is `pretrained=<its folder>, gguf_file=<its name>`, as HFLM takes it."""
    path = Path(checkpoint)
    args = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if _is_gguf(path):
        return {**_pretrained(str(path)), **args}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found, and not a .gguf file")
    adapter_config = path / "adapter_config.json"
    if adapter_config.exists():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config}: field 'base_model_name_or_path' is missing")
        return {**_pretrained(base), "peft": str(path), **args}
    return {"pretrained": str(path), **args}


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _pretrained(source: str) -> dict:
    path = Path(source)
    return {"pretrained": str(path.parent), "gguf_file": path.name} if _is_gguf(path) else {"pretrained": source}


def summarize_results(raw_results: Mapping[str, Mapping]) -> dict:
    """{task: {metric: {"mean": m, "stderr": s}}} from the harness's {"acc,none": m, "acc_stderr,none": s}."""
    summary: dict[str, dict] = {}
    for task, metrics in raw_results.items():
        row: dict[str, dict] = {}
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            label = name if filter_name in ("", "none") else f"{name}[{filter_name}]"
            stderr = metrics.get(f"{name}_stderr,{filter_name}" if filter_name else f"{name}_stderr")
            row[label] = {"mean": float(value),
                          "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        summary[task] = row
    return summary


def run_lm_eval(checkpoint: str | os.PathLike, tasks: Sequence[str], include_path: str | None = None,
                num_fewshot: int | None = None, batch_size: int = 1, limit: float | None = None,
                device: str = "cpu", dtype: str = "float32", seed: int = 0,
                trust_remote_code: bool = False) -> dict:
    """Run harness `tasks` on a checkpoint with HFLM; returns `summarize_results` of the scores.

    `limit` caps examples per task (a smoke run); scores on a limit are not comparable to papers.
    """
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("harness.tasks: give at least one lm-evaluation-harness task name")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    output = lm_eval.simple_evaluate(
        model="hf", model_args=hflm_model_args(checkpoint, dtype, trust_remote_code), tasks=list(tasks),
        num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit, task_manager=manager,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)
    if output is None:  # the harness returns None on non-zero ranks of a distributed run
        return {}
    return summarize_results(output["results"])


def alignment_tax(scores: Mapping[str, Mapping[str, Mapping]], reference: str) -> dict:
    """{model: {task/metric: score(model) - score(reference)}}; negative = capability lost (Table 3)."""
    if reference not in scores:
        raise KeyError(f"alignment_tax: reference {reference!r} not among {sorted(scores)}")
    base = scores[reference]
    deltas: dict[str, dict] = {}
    for model, tasks in scores.items():
        deltas[model] = {f"{task}/{metric}": value["mean"] - base[task][metric]["mean"]
                         for task, metrics in tasks.items() for metric, value in metrics.items()
                         if task in base and metric in base[task]}
    return deltas
