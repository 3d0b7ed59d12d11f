"""Registry of testbed experiments: CLI name -> "module:function", imported only when run.

Each function is `run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict` and writes
out_dir/results.json, out_dir/table.md and PNG plots. `run_all` puts each experiment in out_dir/<name>/
and skips, with a message, one whose module is not installed (the language-level ones live in
separate modules written alongside) and the real-model one (`real-lm`, which needs SmolLM2 and
tens of minutes; run it by name).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import time
from pathlib import Path

EXPERIMENTS: dict[str, str] = {
    "rate": "distalign.testbed.experiments.rate:run",
    "rkl-optimum": "distalign.testbed.experiments.rkl_optimum:run",
    "dpo-degeneracy": "distalign.testbed.experiments.dpo_degeneracy:run",
    "undesirable-space": "distalign.testbed.experiments.undesirable_space:run",
    "coverage": "distalign.testbed.experiments.coverage:run",
    "misspecification": "distalign.testbed.experiments.misspecification:run",
    "lm-rate": "distalign.testbed.experiments.lm_rate:run",
    "mixed-feedback": "distalign.testbed.experiments.mixed_feedback:run",
    "real-lm": "distalign.testbed.experiments.real_lm:run",
}


NOT_IN_ALL = ("real-lm",)


class ExperimentUnavailable(RuntimeError):
    """The experiment's module is not present in this installation."""


def load_experiment(name: str):
    """The run function behind a registry name; ExperimentUnavailable if its module is missing."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    module_name, function_name = EXPERIMENTS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # a missing dependency inside an existing module is a real error
            raise
        raise ExperimentUnavailable(f"experiment {name!r}: module {module_name} is not available") from None
    return getattr(module, function_name)


def describe(name: str) -> str:
    """The first docstring paragraph of an experiment's module, read without importing it (for --help)."""
    spec = importlib.util.find_spec(EXPERIMENTS[name].split(":")[0])
    if spec is None or not spec.origin:
        return "(not installed)"
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, on one line
    return (first.split(": ", 1)[1] if ": " in first else first).rstrip(",")


def run_experiment(name: str, out_dir: Path, quick: bool = False, seed: int = 0, **options) -> dict:
    """Run one experiment, writing its files into out_dir; returns its results dict. `options` go to
    experiments that take more (mixed-feedback: config=MixedFeedbackConfig)."""
    return load_experiment(name)(Path(out_dir), quick=quick, seed=seed, **options)


def run_all(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, str]:
    """Every registered experiment into out_dir/<name>/; returns name -> "ok (s)" or "skipped: why"."""
    status = {}
    for name in EXPERIMENTS:
        if name in NOT_IN_ALL:
            status[name] = "skipped: run it by name"
            continue
        start = time.perf_counter()
        try:
            run_experiment(name, Path(out_dir) / name, quick=quick, seed=seed)
        except ExperimentUnavailable as err:
            status[name] = f"skipped: {err}"
            print(f"testbed all: skipping {name}: {err}")
            continue
        status[name] = f"ok ({time.perf_counter() - start:.1f} s)"
        print(f"testbed all: {name} {status[name]}")
    return status
