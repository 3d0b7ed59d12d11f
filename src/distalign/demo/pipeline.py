"""The demo's stages: build the world, train SFT and the reward model, train every method, evaluate."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from distalign.config import OfflineConfig, load_config
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.models import make_tiny
from distalign.testbed.lm import LMWorld
from distalign.testbed.lm_data import preference_pairs, prompt_rows, write_jsonl
from distalign.testbed.lm_policy import world_tokenizer
from distalign.training.offline import train_offline
from distalign.training.online import train_online
from distalign.training.online_pairwise import train_online_pairwise

from .evaluate import evaluate_models
from .report import write_outputs


@dataclass
class DemoSettings:
    """Sizes of one demo run. `quick()` is the one-minute variant used by the tests."""
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
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        return cls(seed=seed, n_words=5, max_len=3, n_prompts=4, n_sft=2000, n_pairs=1000, hidden_size=32,
                   sft_steps=200, pair_steps=80, reward_steps=80, online_steps=30, batch_size=32,
                   eval_samples_per_prompt=64)


# Per-method settings on top of the shared ones. Offline methods use the preference pairs; online
# methods sample from the policy and are scored by the learned reward model, as in seed 001 §6.
OFFLINE = {
    "dpo": ["loss.beta=0.1"],
    "cpo": ["loss.beta=0.1", "loss.variant=full", "loss.margin=0.0"],
    "pmle": ["loss.gamma=1.0"],
    "ipo": ["loss.beta=0.5"],
    "simpo": ["loss.beta=2.0", "loss.margin=0.2"],
}
ONLINE = {
    # The reward model learns R ~ log pi*(y|x) + c(x). Reverse KL with beta + gamma = 1 then targets
    # pi_sft^beta * pi*; RLHF with beta targets pi_sft * pi*^(1/beta), sharper than pi* for beta < 1.
    "reverse_kl": ["loss.kl_coef=0.2", "loss.entropy_coef=0.8", "generation.missing_eos_penalty=-2.0"],
    "ppo": ["loss.kl_coef=0.3", "update_epochs=2", "generation.missing_eos_penalty=-2.0"],
    "grpo": ["loss.kl_coef=0.3", "generation.missing_eos_penalty=-2.0"],
    "rloo": ["loss.kl_coef=0.3", "generation.missing_eos_penalty=-2.0"],
    # seed 001 Algorithm 1 on two fresh samples per prompt, soft labels from the reward model
    "online_distill": ["loss.gamma=1.0", "loss.kl_coef=0.05", "generation.num_samples=2"],
    "rebel": ["loss.eta=1.0", "loss.kl_coef=0.05", "generation.num_samples=2", "update_epochs=2"],
}
PAIRWISE_ONLINE = ("online_distill", "rebel")


def _world_files(settings: DemoSettings, out: Path) -> tuple[LMWorld, dict]:
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
                   "base": base}


def _common(settings: DemoSettings, out: Path, name: str, steps: int) -> list[str]:
    return [f"train.output_dir={out / 'runs' / name}", f"train.max_steps={steps}", f"train.seed={settings.seed}",
            f"train.batch_size={settings.batch_size}", "train.log_every=10", "train.keep_checkpoints=1",
            "data.max_prompt_length=16", "data.max_length=32"]


def train_all(settings: DemoSettings, out: Path, files: dict, log: Callable) -> dict[str, str]:
    """Train SFT, the reward model and every method; returns {name: final model folder}."""
    models: dict[str, str] = {}

    def offline(method: str, name: str, init: str, data: str, steps: int, lr: float, extra=()) -> str:
        log(f"[{len(models) + 1}] {name}")
        cfg = load_config(OfflineConfig, None, [f"method={method}", f"model.name_or_path={init}",
                                                f"data.train={data}", f"optim.learning_rate={lr}",
                                                "optim.warmup_steps=5", *_common(settings, out, name, steps),
                                                *extra])
        return train_offline(cfg, log=lambda *a: None)["final_model"]

    models["sft"] = offline("sft", "sft", files["base"], files["sft"], settings.sft_steps, 3e-3)
    models["reward_model"] = offline("reward", "reward_model", models["sft"], files["pairs"],
                                     settings.reward_steps, 1e-3, ["loss.l2=0.001"])
    for method in settings.methods:
        if method in OFFLINE:
            models[method] = offline(method, method, models["sft"], files["pairs"], settings.pair_steps, 1e-3,
                                     OFFLINE[method])
        elif method in ONLINE:
            log(f"[{len(models) + 1}] {method}")
            schema, trainer = ((OnlinePairwiseConfig, train_online_pairwise) if method in PAIRWISE_ONLINE
                               else (OnlineConfig, train_online))
            cfg = load_config(schema, None, [
                f"method={method}", f"model.name_or_path={models['sft']}", f"data.train={files['prompts']}",
                f"rewards=[{{kind: model, path: '{models['reward_model']}'}}]", "optim.learning_rate=1e-3",
                "generation.temperature=1.0", f"generation.max_new_tokens={settings.max_len + 1}",
                "generation.num_samples=4", *ONLINE[method], f"train.batch_size={settings.n_prompts}",
                *[o for o in _common(settings, out, method, settings.online_steps)
                  if "batch_size" not in o and "data.max_length" not in o]])  # prompts have no response
            models[method] = trainer(cfg, log=lambda *a: None)["final_model"]
        else:
            raise ValueError(f"demo: unknown method {method!r}; valid: {sorted({**OFFLINE, **ONLINE})}")
    return models


def run_demo(out_dir: str | Path = "demo_out", quick: bool = False, seed: int = 0,
             settings: DemoSettings | None = None, log: Callable = print) -> dict:
    """Run the whole demo; writes table.md, results.json, winrate_vs_kl.png and report.md to out_dir."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = settings or (DemoSettings.quick(seed) if quick else DemoSettings(seed=seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"distalign demo ({'quick' if quick else 'full'}): outputs in {out}")
    world, files = _world_files(settings, out)
    log(f"world: {len(world.words)} words, responses up to {world.max_len} words, {len(world.prompts)} prompts; "
        f"tiny Llama hidden {settings.hidden_size}")
    models = train_all(settings, out, files, log)
    log("evaluating every model against the exact target ...")
    results = evaluate_models(world, models, out / "tokenizer", settings)
    elapsed = time.perf_counter() - start
    table = write_outputs(out, results, settings=asdict(settings), elapsed=elapsed)
    log("\n" + table)
    log(f"\nwall time {elapsed:.0f} s; table, plot and report in {out}")
    (out / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}, indent=2))
    return {"results": results, "elapsed_s": elapsed, "out_dir": str(out)}
