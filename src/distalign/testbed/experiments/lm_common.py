"""Shared pieces of the language-level experiments: a small world, a tiny Llama that speaks its words,
runs of the normal offline trainer, and exact scoring against the world's target.

    world = small_world(seed=0)                                   # 4 words, length <= 3, 4 prompts
    init = make_world_model(world, root / "init", seed=0)        # word-level tokenizer + random Llama
    start = sft_to_reference(world, init, root / "sft", n_demos=4096, steps=250, seed=0)
    trainer = run_offline("pmle", start, pairs_path, root / "pmle", steps=60, batch_size=32,
                          learning_rate=1e-3, loss={"gamma": 1.0})
    table = support_logps(world, trained_module(trainer), trainer.tokenizer)   # (X, M) log pi(y|x)
    kl = mean_kl(world_logps(world), table)                       # exact KL(pi*||pi) by enumeration

The policy is trained only through `distalign.training.offline.OfflineTrainer` (the code path of real
runs); this module writes the JSONL files it reads and scores the result with `lm_policy`'s scorer.
Callers run it under `tabular_fit.single_thread()`: at this size two threads on a busy 2-core machine
are several times slower than one.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from distalign.config import OfflineConfig, load_config
from distalign.models import make_tiny
from distalign.training.offline import OfflineTrainer

from ..lm import LMWorld, all_sequences, exact_kl
from ..lm_data import write_jsonl
from ..lm_policy import hf_policy_logprob_fn, world_tokenizer

# Small enough that KL(pi*||pi) is an exact sum over 4 + 16 + 64 = 84 responses per prompt.
WORLD_SIZE = {"n_words": 4, "max_len": 3, "n_prompts": 4}
MODEL_SIZE = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 32}


def small_world(seed: int) -> LMWorld:
    """The world both experiments use; pi* is pi0 tilted by a random token reward (see `lm.LMWorld`)."""
    return LMWorld.create(seed, **WORLD_SIZE)


def make_world_model(world: LMWorld, out_dir: Path, seed: int) -> Path:
    """A randomly initialised tiny Llama whose tokenizer has one token per world word (`world_tokenizer`)."""
    out_dir = Path(out_dir)
    tokenizer = world_tokenizer(world)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    return make_tiny(out_dir / "model", arch="llama", vocab_size=len(tokenizer), seed=seed,
                     tokenizer_dir=out_dir / "tokenizer", **MODEL_SIZE)


def reference_demonstrations(world: LMWorld, n: int, seed: int) -> list[dict]:
    """n rows {prompt, completion}, x uniform and completion ~ pi0(.|x) exactly."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(len(world.prompts), (n,), generator=gen)
    texts = world.decode(world.reference.sample(x, gen))
    return [{"prompt": world.prompts[i], "completion": t} for i, t in zip(x.tolist(), texts)]


def run_offline(method: str, model_dir: Path, train_path: Path, out_dir: Path, *, steps: int, batch_size: int,
                learning_rate: float, seed: int = 0, loss: dict | None = None, schedule: str = "constant",
                train_steps: bool = True) -> OfflineTrainer:
    """An `OfflineTrainer` built from key=value overrides exactly as the CLI builds one.

    train_steps=True runs `trainer.train()` (metrics.jsonl, checkpoint, final model in out_dir);
    False returns the constructed trainer so the caller can step it and look in between.
    No warm-up; a constant learning rate by default, since the runs are short and compared at equal
    step counts.
    """
    overrides = [f"method={method}", f"model.name_or_path={model_dir}", f"data.train={train_path}",
                 f"train.output_dir={out_dir}", "train.overwrite=true", f"train.max_steps={steps}",
                 f"train.batch_size={batch_size}",
                 f"train.seed={seed}", f"train.log_every={max(1, steps // 20)}", "train.progress_bar=false",
                 f"optim.learning_rate={learning_rate}", "optim.warmup_steps=0", f"optim.schedule={schedule}",
                 "data.max_prompt_length=16", "data.max_length=32"]
    overrides += [f"loss.{key}={value}" for key, value in (loss or {}).items()]
    cfg = load_config(OfflineConfig, None, overrides)
    with quiet():
        trainer = OfflineTrainer(cfg, log=lambda *args: None)
        if train_steps:
            trainer.train()
    return trainer


@contextlib.contextmanager
def quiet():
    """Silence the per-save progress bars and prints of the HF / checkpoint layers: an experiment runs
    dozens of short trainings and its own summary lines are what the user should see."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def trained_module(trainer: OfflineTrainer):
    """The trainer's model without accelerate's wrappers (what `support_logps` scores)."""
    return trainer.acc.unwrap_model(trainer.model)


def sft_to_reference(world: LMWorld, init_dir: Path, out_dir: Path, *, n_demos: int, steps: int,
                     seed: int, learning_rate: float = 1e-2, batch_size: int = 64) -> Path:
    """SFT the random model on exact pi0 samples; returns the saved final model (the common start)."""
    out_dir = Path(out_dir)
    demos = out_dir / "demonstrations.jsonl"
    write_jsonl(demos, reference_demonstrations(world, n_demos, seed))
    # cosine decay: the start should be a converged fit of pi0, not a snapshot of a noisy iterate
    run_offline("sft", init_dir, demos, out_dir / "run", steps=steps, batch_size=batch_size,
                learning_rate=learning_rate, seed=seed, schedule="cosine")
    return out_dir / "run" / "final"


def sft_start(world: LMWorld, work: Path, plan: dict, seed: int) -> tuple[Path, torch.Tensor]:
    """The shared start of every language-level run: a tiny Llama SFT'd on exact pi0 samples.

    Returns its folder and its log-prob table over the world's responses (X, M).
    """
    from distalign.models import load_policy, load_tokenizer
    with quiet():
        init = make_world_model(world, work / "init", seed)
        start = sft_to_reference(world, init, work / "sft", n_demos=plan["n_demos"], steps=plan["sft_steps"],
                                 seed=seed)
        model, tokenizer = load_policy(start), load_tokenizer(start)
    return start, support_logps(world, model, tokenizer)


def support_logps(world: LMWorld, model, tokenizer) -> torch.Tensor:
    """log pi(y|x) of a causal LM for every prompt x and every response y of the world: (X, M) float64,
    responses in `lm.all_sequences` order. The model may also put mass elsewhere (longer text,
    prompt words); KL(p||pi) for p on the world's support needs only these entries."""
    model.eval()
    texts = world.decode(all_sequences(len(world.words), world.max_len))
    score = hf_policy_logprob_fn(model, tokenizer, batch_size=512)
    return torch.stack([score([prompt] * len(texts), texts) for prompt in world.prompts])


def world_logps(world: LMWorld, which: str = "target") -> torch.Tensor:
    """Exact log pi*(y|x) ("target") or log pi0(y|x) ("reference") on the same (X, M) grid."""
    tokens = all_sequences(len(world.words), world.max_len)
    lm = {"target": world.target, "reference": world.reference}[which]
    return torch.stack([lm.logprob(torch.full((len(tokens),), x), tokens) for x in range(len(world.prompts))])


def mean_kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> float:
    """E_x KL(p(x)||q(x)) = mean_x sum_y p(y|x) (log p(y|x) - log q(y|x)) over (X, M) tables; 0 log 0 = 0."""
    probs = p_logps.exp()
    terms = torch.where(probs > 0, probs * (p_logps - q_logps), torch.zeros((), dtype=torch.float64))
    return float(terms.sum(-1).mean())


def reference_kl(world: LMWorld) -> float:
    """E_x KL(pi*(x) || pi0(x)): where a perfect SFT start would sit, for scale."""
    return float(exact_kl(world.target, world.reference).mean())
