"""Where a run's metrics go: metrics.jsonl always, plus TensorBoard or Weights & Biases (`train.report_to`)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLogger:
    """Scalars to metrics.jsonl and to TensorBoard or Weights & Biases (`report_to`; main process only),
    plus a tqdm bar. A resumed run (`initial` > 0) purges TensorBoard events after its checkpoint."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, total: int = 0, initial: int = 0,
                 progress_bar: bool = True, description: str = "train", report_to: str = "tensorboard",
                 config: dict | None = None):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.writer = self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=initial + 1 if initial else None)
            except ImportError:  # tensorboard is a dependency, but logging must not kill a run
                self.writer = None
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "distalign"), name=self.dir.name,
                                    dir=str(self.dir), config=config or {})
        if progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in clean.items() if k.split("/")[-1] in (
                "loss", "accuracy", "reward_mean", "kl", "margin")}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


class LogWindow:
    """What the online and iterative loops write to the log: the mean of each per-step scalar over the
    steps since the last line, at every multiple of `every` and at `last_step` (their returned history
    keeps every step). The offline loop averages per example instead (its `_reduce_metrics`)."""

    def __init__(self, every: int, last_step: int):
        self.every, self.last_step = max(1, every), last_step
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, step: int, metrics: dict) -> dict | None:
        """Add step `step`'s metrics (floats); returns the window's means when a line is due, else None."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if step % self.every and step != self.last_step:
            return None
        means = {k: v / self.count for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means
