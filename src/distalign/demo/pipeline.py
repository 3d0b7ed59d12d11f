"""The demo's stages: build the world, train SFT and the reward model, train every method, evaluate."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from distalign.config import OfflineConfig, load_config
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.models import make_tiny
from distalign.models.quiet import quiet_transformers
from distalign.testbed.lm import LMWorld
from distalign.testbed.lm_data import preference_pairs, prompt_rows, write_jsonl
from distalign.testbed.lm_policy import world_tokenizer
from distalign.training.offline import train_offline
from distalign.training.online import train_online
from distalign.training.online_pairwise import train_online_pairwise

from .evaluate import evaluate_models
from .methods import PAIRWISE_ONLINE, Row, chosen_by, chosen_settings, row_overrides, rows
from .report import write_outputs

ORACLE_REWARD = "distalign.testbed.lm_data:world_logprob_reward"


@dataclass
class DemoSettings:
    """Sizes of one demo run. `quick()` is the smaller variant the tests run."""
    seed: int = 0
    n_words: int = 6
    max_len: int = 4
    n_prompts: int = 8
    n_sft: int = 8000
    n_pairs: int = 4000
    hidden_size: int = 64
    sft_steps: int = 800
    pair_steps: int = 300
    reward_steps: int = 300
    online_steps: int = 150
    batch_size: int = 32
    eval_samples_per_prompt: int = 128
    methods: tuple[str, ...] = ("dpo", "cpo", "pmle", "online_distill", "rebel", "ppo", "reverse_kl", "grpo")
    oracle_rows: bool = True        # every online method once more with the oracle reward gamma log pi*
    variant: str = "full"           # whose swept settings (`methods.CHOSEN`) the rows use

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        return cls(seed=seed, n_words=5, max_len=3, n_prompts=4, n_sft=2000, n_pairs=1000, hidden_size=32,
                   sft_steps=200, pair_steps=80, reward_steps=80, online_steps=30, batch_size=32,
                   eval_samples_per_prompt=64, variant="quick")


def build_world_files(settings: DemoSettings, out: Path) -> tuple[LMWorld, dict]:
    world = LMWorld.create(seed=settings.seed, n_words=settings.n_words, max_len=settings.max_len,
                           n_prompts=settings.n_prompts)
    data = out / "data"
    world.save(data / "world.json")
    prompts = [row["prompt"] for row in prompt_rows(world, settings.n_sft, seed=settings.seed)]
    sft_rows = [{"prompt": p, "completion": c}
                for p, c in zip(prompts, world.sample_text(prompts, seed=settings.seed + 1, model="reference"))]
    write_jsonl(data / "sft.jsonl", sft_rows)
    write_jsonl(data / "pairs.jsonl", preference_pairs(world, settings.n_pairs, seed=settings.seed + 2))
    write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in world.prompts * 8])
    tokenizer = world_tokenizer(world)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    base = make_tiny(out / "base", arch="llama", hidden_size=settings.hidden_size, num_layers=2, num_heads=4,
                     vocab_size=len(tokenizer), max_position_embeddings=64, seed=settings.seed,
                     tokenizer_dir=out / "tokenizer")
    return world, {"sft": data / "sft.jsonl", "pairs": data / "pairs.jsonl", "prompts": data / "prompts.jsonl",
                   "base": base, "world": data / "world.json"}


def _common(settings: DemoSettings, out: Path, name: str, steps: int) -> list[str]:
    # overwrite: a demo rebuilds its world, so a rerun into the same folder replaces the earlier runs
    return [f"train.output_dir={out / 'runs' / name}", "train.overwrite=true", f"train.max_steps={steps}",
            f"train.seed={settings.seed}",
            f"train.batch_size={settings.batch_size}", "train.log_every=10", "train.keep_checkpoints=1",
            "data.max_prompt_length=16", "data.max_length=32"]


def train_base(settings: DemoSettings, out: Path, files: dict, log: Callable) -> dict[str, str]:
    """SFT on pi0's samples, then the Bradley-Terry reward model from the SFT model; {name: model folder}."""
    models: dict[str, str] = {}
    log("[1] sft")
    models["sft"] = _offline(settings, out, "sft", "sft", files["base"], files["sft"], settings.sft_steps, 3e-3)
    log("[2] reward_model")
    models["reward_model"] = _offline(settings, out, "reward", "reward_model", models["sft"], files["pairs"],
                                      settings.reward_steps, 1e-3, ["loss.l2=0.001"])
    return models


def _offline(settings, out, method, name, init, data, steps, lr, extra=()) -> str:
    cfg = load_config(OfflineConfig, None, [f"method={method}", f"model.name_or_path={init}", f"data.train={data}",
                                            f"optim.learning_rate={lr}", "optim.warmup_steps=5",
                                            *_common(settings, out, name, steps), *extra])
    return train_offline(cfg, log=lambda *a: None)["final_model"]


def train_row(settings: DemoSettings, out: Path, files: dict, base: dict, row: Row, swept: list[str],
              folder: str | None = None) -> str:
    """Train one row from the SFT start with its fixed settings and the swept ones; returns the model folder."""
    extra = row_overrides(row, swept)
    name = folder or row.folder
    if row.reward == "pairs":
        return _offline(settings, out, row.method, name, base["sft"], files["pairs"], settings.pair_steps, 1e-3,
                        extra)
    reward = (f"{{kind: model, path: '{base['reward_model']}'}}" if row.reward == "model" else
              f"{{kind: callable, path: '{ORACLE_REWARD}', kwargs: {{world: '{Path(files['world']).resolve()}'}}}}")
    schema, trainer = ((OnlinePairwiseConfig, train_online_pairwise) if row.method in PAIRWISE_ONLINE
                       else (OnlineConfig, train_online))
    cfg = load_config(schema, None, [
        f"method={row.method}", f"model.name_or_path={base['sft']}", f"data.train={files['prompts']}",
        f"rewards=[{reward}]", "optim.learning_rate=1e-3", "generation.temperature=1.0",
        f"generation.max_new_tokens={settings.max_len + 1}", "generation.num_samples=4", *extra,
        f"train.batch_size={settings.n_prompts}",
        *[o for o in _common(settings, out, name, settings.online_steps)
          if "batch_size" not in o and "data.max_length" not in o]])  # prompts have no response
    return trainer(cfg, log=lambda *a: None)["final_model"]


def train_all(settings: DemoSettings, out: Path, files: dict, log: Callable) -> tuple[dict[str, str], dict]:
    """Train SFT, the reward model and every row with its chosen settings; returns ({name: final model
    folder}, {row name: the overrides it ran with})."""
    models = train_base(settings, out, files, log)
    used = {}
    for row in rows(settings.methods, settings.oracle_rows):
        log(f"[{len(models) + 1}] {row.name}")
        swept = chosen_settings(settings.variant, row)
        models[row.name] = train_row(settings, out, files, models, row, swept)
        used[row.name] = row_overrides(row, swept)
    return models, used


@quiet_transformers
def run_demo(out_dir: str | Path = "demo_out", quick: bool = False, seed: int = 0,
             settings: DemoSettings | None = None, log: Callable = print) -> dict:
    """Run the whole demo; writes table.md, results.json, winrate_vs_kl.png and report.md to out_dir."""
    settings = settings or (DemoSettings.quick(seed) if quick else DemoSettings(seed=seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"distalign demo ({'quick' if quick else 'full'}): outputs in {out}")
    world, files = build_world_files(settings, out)
    log(f"world: {len(world.words)} words, responses up to {world.max_len} words, {len(world.prompts)} prompts; "
        f"tiny Llama hidden {settings.hidden_size}")
    models, used = train_all(settings, out, files, log)
    log("evaluating every model against the exact target ...")
    results = evaluate_models(world, models, out / "tokenizer", settings)
    elapsed = time.perf_counter() - start
    record = {**asdict(settings), "row_settings": used, "settings_chosen_by": chosen_by(settings.variant)}
    groups = {row.name: row.group for row in rows(settings.methods, settings.oracle_rows)}
    table = write_outputs(out, results, settings=record, elapsed=elapsed, groups=groups)
    log("\n" + table)
    log(f"\nwall time {elapsed:.0f} s; table, plot and report in {out}")
    (out / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}, indent=2))
    return {"results": results, "elapsed_s": elapsed, "out_dir": str(out)}
