"""Evaluation results as JSON and as a markdown table (rows = models / methods, columns = metrics).

Results are `{row_name: {metric: value}}` where a value is a number, a string, None, or a
`{"mean": m, "stderr": s, ...}` mapping (what `WinRate.to_dict` gives has `rate` instead of `mean`).
The table prints "m ± s"; JSON keeps every field, with NaN / inf written as null (strict JSON).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from distalign.data.files import write_text_atomic

_MEAN_KEYS = ("mean", "rate", "accuracy", "kl")
_STDERR_KEYS = {"mean": "stderr", "rate": "stderr", "accuracy": "stderr", "kl": "kl_stderr"}


def _finite_or_none(value):
    """Replace NaN / inf by None, recursively, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _number(value: float, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_cell(value, digits: int = 3) -> str:
    """'m ± s' for a mean/stderr mapping, a number with `digits` decimals, text as is, '–' for missing."""
    if value is None:
        return "–"
    if isinstance(value, Mapping):
        for key in _MEAN_KEYS:
            if key in value:
                mean, stderr = value[key], value.get(_STDERR_KEYS[key])
                if stderr is None or not math.isfinite(float(stderr)):
                    return _number(mean, digits)
                return f"{_number(mean, digits)} ± {_number(stderr, digits)}"
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(value) if isinstance(value, int) else _number(float(value), digits)
    return str(value).replace("|", "\\|")


def markdown_table(results: Mapping[str, Mapping], columns: Sequence[str] | None = None,
                   digits: int = 3, row_header: str = "model") -> str:
    """A GitHub markdown table; columns default to every metric name in order of first appearance."""
    if columns is None:
        columns = list(dict.fromkeys(metric for row in results.values() for metric in row))
    lines = ["| " + " | ".join([row_header, *columns]) + " |",
             "| " + " | ".join(["---"] * (len(columns) + 1)) + " |"]
    for name, row in results.items():
        cells = [format_cell(row.get(column), digits) for column in columns]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Mapping], out_dir: str | os.PathLike, name: str = "eval",
                 columns: Sequence[str] | None = None, extra: Mapping | None = None) -> tuple[Path, Path]:
    """Write `{name}.json` ({"results": ..., **extra}) and `{name}.md`; returns both paths.

    Each file goes to a temporary name first and is renamed, so a crash never leaves half a report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = _finite_or_none({"results": results, **(extra or {})})
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    for path, text in ((json_path, json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n"),
                       (md_path, markdown_table(results, columns))):
        write_text_atomic(path, text)
    return json_path, md_path
