"""`distalign demo --sweep`: choose each row's coefficient on the validation seed (see `methods`).

    distalign demo --sweep --out sweep_full           # the full demo's settings
    distalign demo --sweep --quick --out sweep_quick  # the quick demo's

One world, SFT model and reward model for the validation seed; then every row trains each setting of
its grid from that SFT start with the demo's own steps, and is scored by the exact KL(pi*||pi) (the
enumerated mass off pi*'s support and the exact win-rate against SFT are recorded beside it). The
lowest KL is chosen. sweep.json holds the grid, every score, the choice and the wall time; copy it to
docs/demo_sweep_{full,quick}.json and its "chosen" into `methods.CHOSEN` to make it the demo's.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from distalign.models import load_tokenizer
from distalign.models.quiet import quiet_transformers

from .evaluate import exact_metrics, model_logps
from .methods import GRID, GRID_SIZE, VALIDATION_SEED, Row, rows
from .pipeline import DemoSettings, build_world_files, train_base, train_row


def choose(scores: list[dict]) -> int:
    """Index of the lowest exact KL(pi*||pi); ties go to the earlier setting (the grid's order)."""
    return min(range(len(scores)), key=lambda i: (scores[i]["kl_target_to_policy"], i))


def sweep_row(settings, out: Path, files: dict, base: dict, world, row: Row, sft_logps, tokenizer,
              log: Callable) -> dict:
    """Every grid setting of one row, trained and scored; the row's record for sweep.json."""
    scores = []
    for i, swept in enumerate(GRID[row.method]):
        path = train_row(settings, out, files, base, row, swept, folder=f"{row.folder}_{i}")
        scores.append({"settings": swept, **exact_metrics(world, model_logps(world, path, tokenizer), sft_logps)})
        log(f"  {row.name} {' '.join(swept)}: exact KL(pi*||pi) {scores[-1]['kl_target_to_policy']:.3f}, "
            f"off-support mass {scores[-1]['off_support_mass']:.3f}")
    best = choose(scores)
    return {"grid": scores, "chosen": scores[best]["settings"]}


@quiet_transformers
def run_sweep(out_dir: str | Path, quick: bool = False, seed: int = VALIDATION_SEED,
              settings: DemoSettings | None = None, log: Callable = print) -> dict:
    """Run the sweep for the full (or quick) demo on `seed` (or on `settings`, whose seed is used);
    writes and returns sweep.json's content."""
    settings = settings or (DemoSettings.quick(seed) if quick else DemoSettings(seed=seed))
    seed = settings.seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"distalign demo --sweep ({settings.variant}) on seed {seed}: outputs in {out}")
    world, files = build_world_files(settings, out)
    base = train_base(settings, out, files, log)
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    sft_logps = model_logps(world, base["sft"], tokenizer)
    record = {"variant": settings.variant, "validation_seed": seed, "criterion": "lowest exact KL(pi*||pi)",
              "budget": f"{GRID_SIZE} settings per row, the demo's own steps",
              "settings": asdict(settings), "sft": exact_metrics(world, sft_logps, sft_logps), "rows": {}}
    for row in rows(settings.methods, settings.oracle_rows):
        log(f"[sweep] {row.name}")
        record["rows"][row.name] = sweep_row(settings, out, files, base, world, row, sft_logps, tokenizer, log)
    record["chosen"] = {name: entry["chosen"] for name, entry in record["rows"].items()}
    record["wall_time_s"] = time.perf_counter() - start
    (out / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"chosen: {json.dumps(record['chosen'])}\nwall time {record['wall_time_s']:.0f} s; record in "
        f"{out / 'sweep.json'}")
    return record
