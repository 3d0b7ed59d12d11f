"""Config schemas. Building blocks (model, data, optimiser, run) are shared by every method family;
`OfflineConfig` is the family of SFT, reward models and every pairwise objective in the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .applicability import first_reason, refuse_ignored, split_rule, when
from .ranges import Range

# Ranges every schema shares (interval notation, `config.ranges`).
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, UNIT, REAL = "(0, inf)", "[0, inf)", "[1, inf)", "[0, 1]", "(-inf, inf)"
SEED = "[0, 4294967295]"   # what numpy accepts


def _f(default=None, help: str = "", choices=None, factory=None, range: str | None = None, schema=None):
    """A schema field: `help` for --list-fields, `choices` or a valid `range` checked at load, and
    `schema`: for a mapping whose keys depend on sibling values, a function of the parent's raw values
    returning the dataclass to check it against (see `config.loader`)."""
    meta = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    if range is not None:
        meta["range"] = Range.parse(range)
    if schema is not None:
        meta["schema"] = schema
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraSettings:
    r: int = _f(8, "LoRA rank", range=AT_LEAST_ONE)
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)", range=POSITIVE)
    dropout: float = _f(0.0, "dropout on the LoRA path", range="[0, 1)")
    target_modules: str | list[str] = _f("all-linear", "module names to adapt, or 'all-linear'")


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "local folder, .gguf file or Hugging Face Hub id of an AutoModelForCausalLM")
    tokenizer: Optional[str] = _f(None, "tokenizer path/id; defaults to name_or_path")
    dtype: str = _f("float32", "weight dtype; bf16 / fp16 weights train through fp32 master copies",
                    choices=("float32", "bfloat16", "float16", "auto"))
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
    max_prompt_length: int = _f(256, "prompts longer than this (tokens) are errors, or skipped with skip_invalid",
                                 range=AT_LEAST_ONE)
    max_length: int = _f(512, "prompt + response tokens; longer responses are truncated and counted",
                          range=AT_LEAST_ONE)
    skip_invalid: bool = _f(False, "skip malformed rows and report how many instead of stopping")
    chat_template: str = _f("auto", "render prompts with the tokenizer's chat template (a plain string as one user "
                                    "turn; responses end with its end-of-turn token): auto = when the tokenizer "
                                    "has one, always, or never (raw text; chat rows refused)",
                            choices=("auto", "always", "never"))
    system: Optional[str] = _f(None, "system prompt before every prompt's turns (needs the chat template)")

    def validate(self):
        if not self.train:
            raise ValueError("train", "required but missing")
        if self.max_prompt_length <= 0 or self.max_length <= self.max_prompt_length:
            raise ValueError("max_length", "must exceed max_prompt_length, which must be > 0")
        check_chat_fields(self)


def check_chat_fields(data) -> None:
    """A system prompt exists only through the chat template, so it is refused with chat_template=never."""
    if data.system is not None and data.chat_template == "never":
        raise ValueError("system", "needs the chat template, but chat_template is 'never'")


@dataclass
class OptimConfig:
    learning_rate: float = _f(1e-5, "peak AdamW learning rate", range=POSITIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay", range=NON_NEGATIVE)
    adam_beta1: float = _f(0.9, "AdamW beta1", range="[0, 1)")
    adam_beta2: float = _f(0.999, "AdamW beta2", range="[0, 1)")
    adam_eps: float = _f(1e-8, "AdamW epsilon", range=POSITIVE)
    warmup_steps: int = _f(0, "linear warm-up steps (optimizer steps)", range=NON_NEGATIVE)
    schedule: str = _f("cosine", "decay after warm-up", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping",
                              range=NON_NEGATIVE)


@dataclass
class RunConfig:
    output_dir: str = _f("runs/run", "checkpoints, logs and the final model go here")
    seed: int = _f(0, "seed for data order, initialisation of new heads, and sampling", range=SEED)
    batch_size: int = _f(8, "examples per process per micro-batch", range=AT_LEAST_ONE)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", range=AT_LEAST_ONE)
    epochs: float = _f(1.0, "passes over the training data (ignored if max_steps > 0)", range=NON_NEGATIVE)
    max_steps: int = _f(0, "optimizer steps; 0 = derive from epochs", range=NON_NEGATIVE)
    log_every: int = _f(10, "optimizer steps between log lines (each the mean over those steps; online and "
                            "iterative loops still return every step in their history)", range=AT_LEAST_ONE)
    eval_every: int = _f(0, "optimizer steps between evaluations; 0 = only at the end", range=NON_NEGATIVE)
    save_every: int = _f(0, "optimizer steps between checkpoints; 0 = only at the end", range=NON_NEGATIVE)
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep; 0 keeps every one", range=NON_NEGATIVE)
    mixed_precision: str = _f("no", "autocast dtype; bf16 on fp32 weights: linears in bf16 made from fp32 "
                                    "masters each step, head and log-probs fp32, sampling in bf16",
                              choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer in the backward instead of keeping its "
                                             "activations: far less activation memory, ~1 more forward per step")
    retain_freed_memory: bool = _f(True, "CPU runs: keep freed memory in the process (glibc) so steps "
                                         "reuse pages instead of page-faulting them in again (~3-6% faster)")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir")
    progress_bar: bool = _f(True, "show a tqdm progress bar")
    overwrite: bool = _f(False, "start afresh in an output_dir that holds an earlier run, deleting its "
                                "checkpoints, logs and final model first (without it such a folder is refused)")
    resume_allow: list[str] = _f(help="fields of the run identity a resume may change (e.g. [max_steps] to "
                                      "train further); any other difference from the checkpoint is refused",
                                 factory=list)
    report_to: str = _f("tensorboard", "where metrics go besides metrics.jsonl (wandb needs "
                                       "`pip install 'distalign[wandb]'`)", choices=("tensorboard", "wandb", "none"))
    on_nonfinite: str = _f("stop", "a NaN/inf loss, gradient norm or weight after a step: stop the run, or skip "
                                   "the step (restoring the weights and optimizer state; keeps a copy of both)",
                           choices=("stop", "skip"))
    save_merged: bool = _f(False, "LoRA: also write the adapter merged into the base as a full model to "
                                  "output_dir/final-merged")

    def validate(self):
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("epochs", f"must be > 0 when max_steps is 0 (derive steps from epochs), got {self.epochs}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite", "cannot be combined with resume=true (one continues the run, the "
                                          "other deletes it)")
        if self.report_to == "wandb":
            import importlib.util
            if importlib.util.find_spec("wandb") is None:
                raise ValueError("report_to", "wandb is not installed; pip install 'distalign[wandb]' "
                                              "(or report_to=tensorboard / none)")


# train.* fields that act only under another setting, for every family (each adds them to its rules).
RUN_RULES = {
    "train.save_merged": when(lambda c: c.model.lora is None, "only a LoRA adapter is merged into its base "
                                                              "(a full-weight model is saved whole in final/)"),
    "train.resume_allow": when(lambda c: not c.train.resume, "it names what a resume (train.resume=true) may "
                                                             "change"),
}


OFFLINE_METHODS_EXTRA = ("sft", "reward")


def _offline_loss_schema(values):
    from .signature import offline_loss_schema  # imports the objectives (torch) only when a config loads
    return offline_loss_schema(values)


@dataclass
class OfflineConfig:
    method: str = _f("", "sft, reward, or a pairwise objective (dpo, ipo, hinge, robust_dpo, rpo, cpo, simpo, "
                         "pmle); cpo is Constrained PO (seed 003), not TRL's CPOTrainer (Contrastive PO)")
    model: ModelConfig = _f(help="the policy (or the reward model's backbone for method=reward)",
                            factory=ModelConfig)
    reference: Optional[str] = _f(None, "reference model path/id; default: the policy's initial weights")
    data: DataConfig = _f(help="training data", factory=DataConfig)
    optim: OptimConfig = _f(help="optimiser and schedule", factory=OptimConfig)
    train: RunConfig = _f(help="loop, batching, checkpoints", factory=RunConfig)
    loss: dict = _f(help="hyperparameters of the objective, e.g. {beta: 0.1}; typed and range-checked from its "
                         "signature (`--list-fields` with a method lists them)",
                    factory=dict, schema=_offline_loss_schema)
    share_prompt: bool = _f(True, "pairwise methods: one row [prompt|chosen|rejected] with a 4D mask instead "
                                  "of two rows")
    precompute_reference: bool = _f(False, "pairwise methods: compute reference log-probs once before training "
                                           "and cache them; for the reference-free pmle / simpo this is what "
                                           "turns on the diagnostics frac_in_undesirable and rewards/*")
    group_by_length: bool = _f(False, "batch examples of similar length (runs of 50 batches sorted, batches "
                                       "shuffled): less padding, same randomness of order across batches")

    def validate(self):
        if not self.method:
            raise ValueError("method", "required but missing")
        from distalign.objectives import PAIRWISE_OBJECTIVES  # torch: only when a config loads
        if self.method in PAIRWISE_OBJECTIVES:
            PAIRWISE_OBJECTIVES[self.method].validate(self.loss)  # hyperparameters its variant ignores
        refuse_ignored(self, OFFLINE_RULES)


def _reference_free(config) -> bool:
    from distalign.objectives import PAIRWISE_OBJECTIVES
    objective = PAIRWISE_OBJECTIVES.get(config.method)
    return objective is None or not objective.needs_reference


PAIRWISE_ONLY = "sft and reward read no reference"
OFFLINE_RULES = {
    "reference": first_reason(
        when(lambda c: c.method in OFFLINE_METHODS_EXTRA, PAIRWISE_ONLY),
        when(lambda c: _reference_free(c) and not c.precompute_reference,
             "the objective is reference-free; pi0 enters only its diagnostics, with precompute_reference=true")),
    "precompute_reference": when(lambda c: c.method in OFFLINE_METHODS_EXTRA, PAIRWISE_ONLY),
    "share_prompt": when(lambda c: c.method in OFFLINE_METHODS_EXTRA,
                         "sft and reward encode one response per row already"),
    "train.eval_every": when(lambda c: not c.data.eval, "there is no data.eval to evaluate on"),
    "data.split": split_rule("data.train", "data.eval"),
    **RUN_RULES,
}
