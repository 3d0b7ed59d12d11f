"""Configs of the pairwise online methods (two samples per prompt), the iterative demonstration methods
and Nash learning (SPEC §2 "Online").

    cfg = load_config(OnlinePairwiseConfig, "configs/rebel.yaml", ["train.max_steps=50"])
    train_online_pairwise(cfg)          # online_dpo, online_distill, rebel, pmle_online, nash_md_pg
    train_iterative(cfg)                # spin, spac, rpo_demos
    train_nash(load_config(NashConfig, "configs/nash_md.yaml"))        # tabular Nash-MD (no language model)

One step of the online methods = `train.batch_size` prompts x `generation.num_samples` fresh samples
(pmle_online: a batch of dataset pairs plus fresh samples at their prompts for the KL term; nash_md_pg:
as many again from the mixture opponent).
"""
from __future__ import annotations

from dataclasses import dataclass

from .applicability import first_reason, never, only, refuse_ignored, split_rule, when
from .online import GENERATION_RULES, GenerationConfig, RewardSpec
from .plugins import import_callable
from .schema import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, UNIT, DataConfig, ModelConfig, OptimConfig,
                     RUN_RULES, RunConfig, _f, check_chat_fields)

ONLINE_PAIRWISE_METHODS = ("online_dpo", "online_distill", "rebel", "pmle_online", "spin", "spac", "nash_md",
                           "rpo_demos", "nash_md_pg")
LOOP_METHODS = ("online_dpo", "online_distill", "rebel", "pmle_online", "nash_md_pg")
ITERATIVE_METHODS = ("spin", "spac", "rpo_demos")
NEEDS_PAIRS = ("pmle_online", "spac", "rpo_demos")
NEEDS_DEMOS = ("spin", "spac", "rpo_demos")
NEEDS_SCORES = ("online_dpo", "online_distill", "rebel", "nash_md_pg")
JUDGED = ("online_dpo", "nash_md_pg")              # a pairwise judge may stand in for the reward sources


def uses_reference(config) -> bool:
    """Whether `config`'s method reads pi0: online_dpo, spac and rpo_demos always; the KL-regularised
    loop methods when kl_coef > 0 (nash_md_pg also for its mixture opponent); spin never (its reference
    is the previous iterate)."""
    method, loss = config.method, config.loss
    if method in ("online_dpo", "spac", "rpo_demos"):
        return True
    if method == "spin":
        return False
    return loss.kl_coef > 0 or (method == "nash_md_pg" and loss.mixture > 0)


def samples(config) -> bool:
    """Whether the method draws from the policy: not rpo_demos, not pmle_online without its KL term."""
    return config.method != "rpo_demos" and not (config.method == "pmle_online" and config.loss.kl_coef == 0)


NOT_SAMPLED = "the method draws no samples (rpo_demos; pmle_online with loss.kl_coef=0)"
ITERATIVE_LENGTH = ("spin / spac / rpo_demos run train.max_steps optimizer steps (or iteration.iterations x "
                    "iteration.steps_per_iteration)")
NO_EVALUATION = "these methods have no evaluation loop (run `distalign eval` on the saved model)"
GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "min_new_tokens",
                     "missing_eos_penalty", "backend", "fast_decode")
RULES = {
    **{f"generation.{name}": when(lambda c: not samples(c), NOT_SAMPLED) for name in GENERATION_FIELDS},
    "generation.fast_decode": first_reason(when(lambda c: not samples(c), NOT_SAMPLED),
                                           GENERATION_RULES["generation.fast_decode"]),
    "generation.num_samples": first_reason(when(lambda c: not samples(c), NOT_SAMPLED), only(*LOOP_METHODS)),
    "generation.missing_eos_penalty": first_reason(
        only(*NEEDS_SCORES), when(lambda c: not c.rewards, "the preferences come from the judge, not rewards")),
    "data.train": only(*(m for m in LOOP_METHODS if m != "pmle_online")),
    "data.eval": never(NO_EVALUATION), "train.eval_every": never(NO_EVALUATION),
    "data.split": split_rule("data.train", "pairs", "demonstrations"),
    "data.max_length": only(*NEEDS_PAIRS, *(m for m in NEEDS_DEMOS if m not in NEEDS_PAIRS)),
    "pairs": only(*NEEDS_PAIRS), "demonstrations": only(*NEEDS_DEMOS),
    "judge": only(*JUDGED), "rewards": only(*NEEDS_SCORES),
    "reference": when(lambda c: not uses_reference(c), "it uses no reference model with these settings"),
    "loss.beta": only("online_dpo", "spin", "spac", "rpo_demos"),
    "loss.gamma": only("online_distill", "pmle_online"),
    "loss.eta": only("rebel"),
    "loss.kl_coef": only("online_distill", "rebel", "pmle_online", "nash_md_pg"),
    "loss.mixture": only("nash_md_pg"),
    "loss.alpha": only("spac", "rpo_demos"),
    "update_epochs": only("online_dpo", "online_distill", "rebel"),
    "iteration.iterations": first_reason(only(*ITERATIVE_METHODS),
                                         when(lambda c: c.train.max_steps > 0, "train.max_steps sets the length")),
    "iteration.steps_per_iteration": only(*ITERATIVE_METHODS),
    "train.gradient_accumulation_steps": never("these loops take one batch per optimizer step (raise "
                                               "train.batch_size instead)"),
    "train.epochs": when(lambda c: c.method in ITERATIVE_METHODS, ITERATIVE_LENGTH),
    **RUN_RULES,
}


@dataclass
class PromptDataConfig(DataConfig):
    """`DataConfig` whose `train` (the prompts file) may be empty: pmle_online and the iterative methods
    sample at the prompts of their pairs / demonstrations; the length limits apply to every file
    (`max_length` to the files with responses, checked by the config that knows which it reads)."""

    def validate(self):
        check_chat_fields(self)


def check_response_limits(data) -> None:
    """max_length bounds prompt + response, so it must exceed max_prompt_length where responses are read."""
    if data.max_length <= data.max_prompt_length:
        raise ValueError("data.max_length", "must exceed data.max_prompt_length")


@dataclass
class PairwiseLossConfig:
    beta: float = _f(0.1, "DPO / SPIN / SPAC / RPO inverse temperature on the log-ratio margin",
                      range=POSITIVE)
    gamma: float = _f(1.0, "PMLE / distillation preference sharpness (seed 001 Eq. 3)", range=POSITIVE)
    eta: float = _f(1.0, "REBEL: regress the log-ratio gap onto eta * (R(a) - R(b)) (seed 001 Eq. 10)",
                     range=POSITIVE)
    kl_coef: float = _f(0.05, "beta of KL(pi||pi0) (Nash-MD's tau): score-function term (online_distill, "
                              "pmle_online, nash_md_pg), folded into the reward (rebel); 0 skips "
                              "it (and the reference unless the mixture uses it)", range=NON_NEGATIVE)
    mixture: float = _f(0.125, "nash_md_pg: beta of the opponent pi_mix ∝ pi^(1-beta) pi_ref^beta, in "
                               "[0, 1]; 0 = self-play (Munos et al. 2024 Sec. 7: 0.125 did best)", range=UNIT)
    alpha: float = _f(1.0, "weight of the preference-pair term (spac, rpo_demos)", range=NON_NEGATIVE)


@dataclass
class IterationConfig:
    iterations: int = _f(2, "outer iterations: sample from the current policy, build pairs, update (not "
                             "with train.max_steps > 0, which sets the length)", range=AT_LEAST_ONE)
    steps_per_iteration: int = _f(20, "policy optimizer steps per iteration (spin, spac, rpo_demos); with "
                                      "train.max_steps > 0 the run has that many steps in rounds of this length",
                                  range=AT_LEAST_ONE)


@dataclass
class OnlinePairwiseConfig:
    method: str = _f("", " | ".join(m for m in ONLINE_PAIRWISE_METHODS if m != "nash_md"),
                     choices=tuple(m for m in ONLINE_PAIRWISE_METHODS if m != "nash_md"))
    model: ModelConfig = _f(help="the policy", factory=ModelConfig)
    reference: str | None = _f(None, "reference model path/id; default: the policy's initial weights")
    data: PromptDataConfig = _f(help="prompts for fresh samples (online_dpo, online_distill, rebel, "
                                     "nash_md_pg) and the length limits of every file",
                                factory=PromptDataConfig)
    pairs: str | None = _f(None, "preference pairs file (pmle_online, spac, rpo_demos)")
    demonstrations: str | None = _f(None, "demonstrations file (spin, spac, rpo_demos)")
    optim: OptimConfig = _f(help="optimiser and schedule", factory=OptimConfig)
    train: RunConfig = _f(help="loop, batching (batch_size = prompts or pairs per step), checkpoints",
                          factory=RunConfig)
    generation: GenerationConfig = _f(help="sampling; log-probs are taken at this temperature (use 1.0 for "
                                           "the unbiased KL of pmle_online / online_distill)",
                                      factory=lambda: GenerationConfig(num_samples=2))
    rewards: list[RewardSpec] = _f(help="reward sources scoring fresh samples (labels of online_dpo, soft "
                                        "labels of online_distill, regression target of rebel, "
                                        "preference sigma(R(y) - R(y')) of nash_md_pg)", factory=list)
    judge: str | None = _f(None, "online_dpo, nash_md_pg: 'module:function' fn(prompts, a, b) -> list of "
                                 "P(a > b) (may be non-transitive); used instead of the rewards")
    loss: PairwiseLossConfig = _f(help="objective hyperparameters", factory=PairwiseLossConfig)
    update_epochs: int = _f(1, "passes over each rollout (REBEL's several epochs per batch)", range=AT_LEAST_ONE)
    iteration: IterationConfig = _f(help="outer loop of the iterative methods", factory=IterationConfig)

    def validate(self):
        if not self.method:
            raise ValueError("method", "required but missing")
        if self.method in NEEDS_PAIRS and not self.pairs:
            raise ValueError("pairs", f"method {self.method} needs a preference pairs file")
        if self.method in NEEDS_DEMOS and not self.demonstrations:
            raise ValueError("demonstrations", f"method {self.method} needs a demonstrations file")
        if self.judge:
            try:
                import_callable(self.judge)   # so a bad plugin fails now, before any model loads
            except ValueError as err:
                raise ValueError("judge", str(err)) from None
        if self.method in NEEDS_SCORES and not self.rewards and not (self.method in JUDGED and self.judge):
            raise ValueError("rewards", f"method {self.method} needs at least one reward source (or a judge)")
        if self.method in NEEDS_SCORES and not self.data.train:
            raise ValueError("data", "train: method needs a prompts file")
        k = self.generation.num_samples
        pairs_samples = self.method not in ("pmle_online", "nash_md_pg")   # consecutive samples form pairs
        if self.method in LOOP_METHODS and (k < 2 or (k % 2 and pairs_samples)):
            raise ValueError("generation", f"num_samples: {self.method} needs >= 2 samples per prompt (an "
                                           f"even number where consecutive samples form pairs), got {k}")
        if self.update_epochs > 1 and self.method == "nash_md_pg":
            raise ValueError("update_epochs", "must be 1 for nash_md_pg, whose policy gradient has no "
                                              "importance ratio for a second pass")
        if self.method in NEEDS_PAIRS + NEEDS_DEMOS:
            check_response_limits(self.data)
        refuse_ignored(self, RULES)


@dataclass
class NashRunConfig:
    """nash_md's `train`: the same train.max_steps / output_dir / seed as every method; the exact tabular
    solver has no batches, optimizer, checkpoints or logs, so the other train.* fields are unknown keys."""
    max_steps: int = _f(2000, "Nash-MD iterations", range=AT_LEAST_ONE)
    output_dir: str = _f("runs/nash_md", "results.json and table.md go here")
    seed: int = _f(0, "problem seed", range=SEED)


@dataclass
class NashConfig:
    """Nash mirror descent on the tabular testbed with non-transitive annotators."""
    method: str = _f("nash_md", "nash_md", choices=("nash_md",))
    n_contexts: int = _f(2, "contexts of the tabular problem", range=AT_LEAST_ONE)
    n_responses: int = _f(4, "responses per context (>= 3 for the Condorcet cycle)", range="[3, inf)")
    switch: str = _f("condorcet", "preference model of `distalign.testbed.misspecification`")
    strength: float = _f(8.0, "switch strength (Condorcet score scale)", range=NON_NEGATIVE)
    eta: float = _f(0.5, "mirror-descent step size", range=POSITIVE)
    tau: float = _f(0.02, "KL regularisation toward the reference", range=NON_NEGATIVE)
    bt_beta: float = _f(0.02, "KL coefficient of the Bradley-Terry + RLHF baseline", range=POSITIVE)
    train: NashRunConfig = _f(help="iterations (max_steps), output_dir, seed", factory=NashRunConfig)

    def validate(self):
        if self.eta * self.tau > 1:
            raise ValueError("eta", f"eta * tau must be <= 1, got {self.eta} * {self.tau}")
