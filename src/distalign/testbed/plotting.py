"""Writers shared by the experiments: results.json, a markdown table, line plots (matplotlib Agg)."""
from __future__ import annotations

import json
import math
import textwrap
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
    def cell(value) -> str:   # a '|' inside a cell (KL(p||q)) would end the cell: escape it
        return format_cell(value).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(out_dir: Path, sections: Sequence[tuple[str, str]]) -> Path:
    """table.md from (title, markdown body) sections."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "table.md"
    path.write_text("\n\n".join(f"## {title}\n\n{body}" for title, body in sections) + "\n")
    return path


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "-.", ":", (0, (5, 1, 1, 1)))
REFERENCE_COLOURS = ("grey", "black", "tan")
REFERENCE_DASHES = ((5, 3), (2, 2), (8, 2, 2, 2))


def coinciding(series: dict[str, tuple[Sequence[float], Sequence[float]]], rtol: float = 1e-6) -> list[tuple[str, str]]:
    """Pairs of series drawn on top of each other (same x, y equal within rtol): a plot must say so."""
    names, pairs = list(series), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (xa, ya), (xb, yb) = series[a], series[b]
            if len(xa) == len(xb) and np.allclose(xa, xb) and np.allclose(ya, yb, rtol=rtol, atol=0.0):
                pairs.append((a, b))
    return pairs


def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
              ylabel: str, title: str, loglog: bool = False, logy: bool = False,
              hline: float | None = None, reference: Sequence[str] = (),
              errors: dict[str, Sequence[float]] | None = None, note: str = "") -> Path:
    """One PNG with a line per series name -> (x values, y values).

    Every curve has its own marker and line style, so none hides another silently; series that
    coincide anyway are named in an annotation ("identical", or "within 5%"), together with `note`. Series named in
    `reference` (slope guides, floors, starting points) and `hline` are dashed grey. `errors` adds
    error bars (e.g. standard errors) to the named series. The legend sits outside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    curves = [name for name in series if name not in reference]
    for i, name in enumerate(curves):
        xs, ys = series[name]
        style = dict(marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                     markersize=5 if i % 2 else 4, fillstyle="none" if i % 2 else "full", label=name)
        if errors and name in errors:
            ax.errorbar(xs, ys, yerr=errors[name], capsize=2, **style)
        else:
            ax.plot(xs, ys, **style)
    for i, name in enumerate(n for n in reference if n in series):
        ax.plot(*series[name], color=REFERENCE_COLOURS[i % len(REFERENCE_COLOURS)], linestyle="--",
                dashes=REFERENCE_DASHES[i % len(REFERENCE_DASHES)], linewidth=1.0, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
    if loglog:
        ax.set_xscale("log")
    if loglog or logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    identical = coinciding(series)
    close = [pair for pair in coinciding(series, rtol=0.05) if pair not in identical]
    notes = ([f"{a} = {b}: identical, the curves overlap" for a, b in identical]
             + [f"{a} ≈ {b}: within 5% at every point, the curves overlap" for a, b in close]
             + ([note] if note else []))
    lines = [line for text in notes for line in textwrap.wrap(text, 130)]
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.035 * len(lines), 1, 1))
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
