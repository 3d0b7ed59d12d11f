"""Config schemas. Building blocks (model, data, optimiser, run) are shared by every method family;
`OfflineConfig` is the family of SFT, reward models and every pairwise objective in the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def _f(default=None, help: str = "", choices=None, factory=None):
    meta = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraSettings:
    r: int = _f(8, "LoRA rank")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the LoRA path")
    target_modules: str | list[str] = _f("all-linear", "module names to adapt, or 'all-linear'")


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "local folder or Hugging Face Hub id of an AutoModelForCausalLM")
    tokenizer: Optional[str] = _f(None, "tokenizer path/id; defaults to name_or_path")
    dtype: str = _f("float32", "weight dtype", choices=("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = _f(False, "allow custom modelling code from the checkpoint (off by default)")
    lora: Optional[LoraSettings] = _f(None, "train a LoRA adapter; the reference is the base with it disabled")

    def validate(self):
        if not self.name_or_path:
            raise ValueError("name_or_path", "required but missing")

    def load_options(self) -> dict:
        """The keyword arguments of `load_policy` / `load_reward_model` this section sets."""
        return {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}


@dataclass
class DataConfig:
    train: str = _f("", "training data: JSONL/JSON/Parquet/CSV file, save_to_disk folder, or Hub id")
    eval: Optional[str] = _f(None, "held-out data of the same kind (optional)")
    split: str = _f("train", "split name for folders and Hub datasets")
    max_prompt_length: int = _f(256, "prompts longer than this (tokens) are errors, or skipped with skip_invalid")
    max_length: int = _f(512, "prompt + response tokens; longer responses are truncated and counted")
    skip_invalid: bool = _f(False, "skip malformed rows and report how many instead of stopping")

    def validate(self):
        if not self.train:
            raise ValueError("train", "required but missing")
        if self.max_prompt_length <= 0 or self.max_length <= self.max_prompt_length:
            raise ValueError("max_length", "must exceed max_prompt_length, which must be > 0")


@dataclass
class OptimConfig:
    learning_rate: float = _f(1e-5, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(0, "linear warm-up steps (optimizer steps)")
    schedule: str = _f("cosine", "decay after warm-up", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")


@dataclass
class RunConfig:
    output_dir: str = _f("runs/run", "checkpoints, logs and the final model go here")
    seed: int = _f(0, "seed for data order, initialisation of new heads, and sampling")
    batch_size: int = _f(8, "examples per process per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    epochs: float = _f(1.0, "passes over the training data (ignored if max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0 = derive from epochs")
    log_every: int = _f(10, "optimizer steps between log lines")
    eval_every: int = _f(0, "optimizer steps between evaluations; 0 = only at the end")
    save_every: int = _f(0, "optimizer steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep")
    mixed_precision: str = _f("no", "autocast dtype", choices=("no", "bf16", "fp16"))
    retain_freed_memory: bool = _f(True, "CPU runs: keep freed memory in the process (glibc) so steps "
                                         "reuse pages instead of page-faulting them in again (~3-6% faster)")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir")
    progress_bar: bool = _f(True, "show a tqdm progress bar")

    def validate(self):
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(name, "must be >= 1")


OFFLINE_METHODS_EXTRA = ("sft", "reward")


@dataclass
class OfflineConfig:
    method: str = _f("", "sft, reward, or a pairwise objective (dpo, ipo, hinge, robust_dpo, rpo, cpo, simpo, pmle)")
    model: ModelConfig = _f(help="the policy (or the reward model's backbone for method=reward)",
                            factory=ModelConfig)
    reference: Optional[str] = _f(None, "reference model path/id; default: the policy's initial weights")
    data: DataConfig = _f(help="training data", factory=DataConfig)
    optim: OptimConfig = _f(help="optimiser and schedule", factory=OptimConfig)
    train: RunConfig = _f(help="loop, batching, checkpoints", factory=RunConfig)
    loss: dict = _f(help="hyperparameters of the objective, e.g. {beta: 0.1}; checked against its signature",
                    factory=dict)
    share_prompt: bool = _f(True, "one row [prompt|chosen|rejected] with a 4D mask instead of two rows")
    precompute_reference: bool = _f(False, "compute reference log-probs once before training and cache them")
    group_by_length: bool = _f(False, "batch examples of similar length (runs of 50 batches sorted, batches "
                                       "shuffled): less padding, same randomness of order across batches")

    def validate(self):
        if not self.method:
            raise ValueError("method", "required but missing")
