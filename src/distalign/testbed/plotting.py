"""Writers shared by the experiments: results.json, a markdown table, line plots (matplotlib Agg)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_jsonable(value):
    """Tensors / arrays -> nested lists, numpy scalars -> Python numbers, non-finite floats -> strings."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()] if value.ndim else to_jsonable(value.item())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def write_results(out_dir: Path, results: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(to_jsonable(results), indent=1) + "\n")
    return path


def format_cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(out_dir: Path, sections: Sequence[tuple[str, str]]) -> Path:
    """table.md from (title, markdown body) sections."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "table.md"
    path.write_text("\n\n".join(f"## {title}\n\n{body}" for title, body in sections) + "\n")
    return path


def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
              ylabel: str, title: str, loglog: bool = False, logy: bool = False,
              hline: float | None = None) -> Path:
    """One PNG with a line per series name -> (x values, y values)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if loglog:
        ax.set_xscale("log")
    if loglog or logy:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loglog_slope(ns: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(n)."""
    return float(np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(values, float)), 1)[0])


def bootstrap_slope(ns: Sequence[float], per_seed: np.ndarray, n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Slope of log mean-over-seeds against log n, and a 95% percentile interval from resampling the
    seeds of each n independently (each n has its own datasets). per_seed: (len(ns), S)."""
    rng = np.random.default_rng(seed)
    n_points, n_seeds = per_seed.shape
    picks = rng.integers(0, n_seeds, size=(n_boot, n_points, n_seeds))
    boot_means = np.take_along_axis(per_seed[None].repeat(n_boot, 0), picks, axis=2).mean(-1)
    x = np.log(np.asarray(ns, float))
    x_centred = x - x.mean()
    slopes = (np.log(boot_means) * x_centred).sum(-1) / (x_centred ** 2).sum()
    low, high = np.percentile(slopes, [2.5, 97.5])
    return loglog_slope(ns, per_seed.mean(-1)), float(low), float(high)
