"""The field walk (issue 16): every config field of every method changes what that method does, or is
refused for it with a one-line error that names the field.

For each family (OfflineConfig, OnlineConfig, OnlinePairwiseConfig with spin / spac / rpo_demos,
NashConfig, IRLConfig) the walk lists every field of the schema (offline: also each method's `loss.*`,
from its objective's signature) and looks it up in the family's checks. A field without a check fails
with "add a check for field X"; that is the point: a new field must say how it shows. A check gives a
value for the field and, per method, either expects a refusal or trains the method for two steps with
and without the value (after the check's context, which both runs share) and requires that the
`field_walk.Record`s differ: weights, metrics, files, progress bars, forwards, loader arguments.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from distalign.config import OfflineConfig, load_config
from distalign.config.irl import IRLConfig
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import (ITERATIVE_METHODS, JUDGED, LOOP_METHODS, NEEDS_DEMOS, NEEDS_PAIRS,
                                              NEEDS_SCORES, NashConfig, OnlinePairwiseConfig)
from distalign.objectives import PAIRWISE_OBJECTIVES
from field_walk import ALL, REWARDS_MODULE, Check, Spies, Walk, coverage_failures, probe

OFFLINE = ("sft", "reward", *PAIRWISE_OBJECTIVES)
ONLINE = ("ppo", "reinforce", "rloo", "grpo", "reverse_kl")
PAIRWISE = (*LOOP_METHODS, *ITERATIVE_METHODS)
IRL = ("irl", "aihf")


def C(value, refused=(), **kwargs) -> Check:
    return Check(value, frozenset(refused) if refused is not ALL else ALL, **kwargs)


def others(keep, family) -> frozenset:
    return frozenset(set(family) - set(keep))


# -- the world every probe trains on -------------------------------------------------------------------

class Env:
    pass


# The world's tokenizer with a chat template (data.chat_template, data.system show with it): each turn is
# its role and text closed by EOS; role words are <unk> to the world's vocabulary, which is fine.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def permuted_tokenizer(world):
    """The world's word-level tokenizer with its words in reverse order: same size, other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = sorted({w for text in [*world.prompts, *world.words] for w in text.split()}, reverse=True)
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def save_folder(path: Path, train_rows: list, other_rows: list) -> str:
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows),
                          "other": datasets.Dataset.from_list(other_rows)}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from distalign.models import make_tiny, make_tiny_reward_model
    from distalign.testbed.lm import LMWorld
    from distalign.testbed.lm_data import demonstrations, preference_pairs, prompt_rows, write_jsonl
    from distalign.testbed.lm_policy import world_tokenizer
    from distalign.training.offline import train_offline
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("walk")
    e = Env()
    e.root = root
    world = LMWorld.create(seed=3, n_words=4, max_len=3, n_prompts=4)
    e.words = world.words
    tok = world_tokenizer(world)
    tok.save_pretrained(str(root / "tok"))
    permuted_tokenizer(world).save_pretrained(str(root / "tok2"))
    e.tok2 = str(root / "tok2")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(root / "tok_chat"))
    tok.chat_template = None
    e.tok_chat = str(root / "tok_chat")
    size = dict(hidden_size=16, num_layers=1, num_heads=2, vocab_size=len(tok), tokenizer_dir=root / "tok",
                max_position_embeddings=32)
    base = make_tiny(root / "base", **size)
    e.other = str(make_tiny(root / "other", seed=1, **size))
    e.rm, e.rm2 = (str(make_tiny_reward_model(root / name, seed=s, **size)) for name, s in (("rm", 2), ("rm2", 3)))
    rows = {"demos": demonstrations(world, 32, seed=1), "pairs": preference_pairs(world, 32, seed=2),
            "prompts": prompt_rows(world, 32, seed=3)}
    lengths = sorted({len(tok(r["prompt"])["input_ids"]) for r in rows["prompts"]})
    e.prompt_limit, e.max_prompt = lengths[-1], 2 * lengths[-1]
    for data in rows.values():  # a quarter of the rows with a prompt twice as long (data.max_prompt_length shows)
        for row in data[::4]:
            row["prompt"] = f"{row['prompt']} {row['prompt']}"
    empty = {"demos": ("completion", ""), "pairs": ("chosen", ""), "prompts": ("prompt", "")}
    for kind, data in rows.items():
        write_jsonl(root / f"{kind}.jsonl", data[:16])
        write_jsonl(root / f"{kind}_b.jsonl", data[16:])
        key, value = empty[kind]
        write_jsonl(root / f"{kind}_bad.jsonl", [*data[:15], {**data[15], key: value}])
        setattr(e, f"{kind}_folder", save_folder(root / f"{kind}_folder", data[:16], data[16:]))
        for suffix in ("", "_b", "_bad"):
            setattr(e, kind + suffix, str(root / f"{kind}{suffix}.jsonl"))
    # a policy that ends responses with EOS about as often as not (min_new_tokens, missing_eos_penalty show)
    sft = load_config(OfflineConfig, None, [
        "method=sft", f"model.name_or_path={base}", f"data.train={root / 'demos.jsonl'}", "train.max_steps=30",
        "train.batch_size=8", "optim.learning_rate=1e-2", "train.progress_bar=false",
        f"train.output_dir={root / 'sft'}"])
    e.policy = train_offline(sft, log=lambda *a: None)["final_model"]
    (root / "walk_rewards.py").write_text(REWARDS_MODULE)
    sys.path.insert(0, str(root))
    yield e
    sys.path.remove(str(root))
    torch.set_num_threads(threads)


# -- checks shared by the families --------------------------------------------------------------------

REWARD = "[{kind: callable, path: 'walk_rewards:length_reward'}]"


def model_checks(e: Env, refused_lora=()) -> dict:
    lora = frozenset(refused_lora)
    with_lora = () if lora else ("model.lora={}",)  # where lora is refused, each field alone is refused
    return {
        "model.name_or_path": [C(e.other)], "model.tokenizer": [C(e.tok2)], "model.dtype": [C("bfloat16")],
        "model.trust_remote_code": [C("true")], "model.lora": [C("{}", lora)],
        "model.lora.r": [C("4", lora, context=with_lora)], "model.lora.alpha": [C("32", lora, context=with_lora)],
        "model.lora.dropout": [C("0.5", lora, context=with_lora)],
        "model.lora.target_modules": [C("[q_proj, v_proj]", lora, context=with_lora)],
    }


def optim_checks(prefix: str = "optim.") -> dict:
    values = {"learning_rate": "2e-2", "weight_decay": "0.5", "adam_beta1": "0.5", "adam_beta2": "0.9",
              "adam_eps": "0.1", "warmup_steps": "2", "schedule": "constant", "max_grad_norm": "1e-4"}
    return {prefix + k: [C(v)] for k, v in values.items()}


def data_checks(train: Callable, bad: Callable, refused_eval=(), refused_max_length=(), split_folder=None) -> dict:
    """data.*: `train(e, method)` is another training file, `bad(e, method)` the override of a broken one,
    `split_folder(e, method)` the override of a dataset folder with a second split "other"."""
    split = [C("other", ALL)]
    if split_folder is not None:
        split.append(C("other", context=lambda e, m: (split_folder(e, m),)))
    return {
        "data.train": [C(train)], "data.split": split,
        "data.eval": [C(train, refused_eval)],
        "data.max_prompt_length": [C(lambda e, m: str(e.prompt_limit), context=("data.skip_invalid=true",))],
        "data.max_length": [C(lambda e, m: str(e.max_prompt + 1), refused_max_length,
                              context=lambda e, m: (f"data.max_prompt_length={e.max_prompt}",))],
        "data.skip_invalid": [C("true", context=lambda e, m: (bad(e, m),), unlocks=True)],
        # the world's tokenizer has no template: "always" and a system prompt are refused; with one, prompts
        # are rendered through it unless "never", and the system prompt is a turn of its own
        "data.chat_template": [C("always", ALL), C("never", context=chat_tokenizer)],
        "data.system": [C("Be brief.", ALL), C("Be brief.", context=chat_tokenizer)],
    }


def chat_tokenizer(e, m) -> tuple:
    return (f"model.tokenizer={e.tok_chat}",)


def run_checks(refused_epochs=(), huge_lr="optim.learning_rate=1e39", lora=True) -> dict:
    """train.*: a resume, train.overwrite and train.resume_allow run after a one-step run into the same
    folder (which a plain second run refuses); on_nonfinite=skip lets a run with `huge_lr` finish."""
    no_epochs = frozenset(refused_epochs)
    more_steps = ("train.resume_allow=[max_steps]",)  # the one-step run's step count differs
    return {
        "train.output_dir": [C("", observe="output_dir")], "train.seed": [C("1")],
        "train.batch_size": [C("3")], "train.max_steps": [C("3")],
        "train.epochs": [C("0.5", no_epochs, context=lambda e, m: () if m in no_epochs else ("train.max_steps=0",))],
        "train.log_every": [C("2")], "train.save_every": [C("1")],
        "train.keep_checkpoints": [C("1", context=("train.save_every=1",))],
        "train.mixed_precision": [C("bf16")], "train.retain_freed_memory": [C("false")],
        "train.gradient_checkpointing": [C("true")], "train.progress_bar": [C("true")],
        "train.resume": [C("true", prepare=True, unlocks=True, extra=more_steps)],
        "train.overwrite": [C("true", prepare=True, unlocks=True)],
        "train.resume_allow": [C("[max_steps]", ALL),
                               C("[max_steps]", context=("train.resume=true",), prepare=True, unlocks=True)],
        "train.report_to": [C("none")],
        "train.on_nonfinite": [C("skip", context=(huge_lr,), unlocks=True)],
        "train.save_merged": [C("true", ALL)] + ([C("true", context=("model.lora={}",))] if lora else []),
    }


def generation_checks(refused_all=(), refused_samples=(), refused_penalty=()) -> dict:
    none = frozenset(refused_all)
    return {
        "generation.max_new_tokens": [C("4", none)], "generation.temperature": [C("0.5", none)],
        "generation.top_k": [C("2", none)], "generation.top_p": [C("0.5", none)],
        "generation.num_samples": [C("4", none | frozenset(refused_samples))],
        "generation.min_new_tokens": [C("2", none)],
        "generation.missing_eos_penalty": [C("-1.0", none | frozenset(refused_penalty))],
        "generation.backend": [C("generate", none)],
        "generation.fast_decode": [C("false", none), C("false", ALL, context=("generation.backend=generate",),
                                                       skip=none)],
    }


def reward_checks(refused=()) -> dict:
    r = frozenset(refused)
    callable_with = lambda extra: f"[{{kind: callable, path: 'walk_rewards:length_reward', {extra}}}]"
    return {
        "rewards": [C("[{kind: callable, path: 'walk_rewards:other_reward'}]", r)],
        "rewards[].kind": [C(lambda e, m: f"[{{kind: model, path: '{e.rm}'}}]", r)],
        "rewards[].path": [C("[{kind: callable, path: 'walk_rewards:other_reward'}]", r)],
        "rewards[].pattern": [C(callable_with("pattern: 'x'"), ALL),
                              C(lambda e, m: f"[{{kind: regex, pattern: '{e.words[1]}'}}]", skip=r,
                                context=lambda e, m: (f"rewards=[{{kind: regex, pattern: '{e.words[0]}'}}]",))],
        "rewards[].weight": [C(callable_with("weight: 2.0"), r)],
        "rewards[].name": [C(callable_with("name: words"), r)],
        "rewards[].kwargs": [C(callable_with("kwargs: {scale: 3.0}"), r)],
    }


# -- the families ---------------------------------------------------------------------------------------

LOSS_VALUES = {"beta": "0.3", "alpha": "0.5", "tau": "2.0", "margin": "0.7", "epsilon": "0.3", "gamma": "2.0",
               "per_token": "false", "nll": "example", "l2": "0.1", "center_rewards_coefficient": "0.1",
               "variant": {"cpo": "simple", "robust_dpo": "robust"}}
# hyperparameters that act only under some setting of another: cpo's variants
LOSS_CONTEXTS = {"cpo": [("tau", "simple", True), ("alpha", "simple", True), ("margin", "simple", False),
                         ("tau", "clip", True), ("alpha", "clip", True), ("margin", "clip", True)]}


def offline_loss_fields(method: str) -> dict:
    """loss.<name> for every hyperparameter of the method's objective (SFT has none)."""
    if method == "sft":
        return {}
    if method == "reward":
        import inspect

        from distalign.objectives import reward_bt_loss
        names = [n for n, p in inspect.signature(reward_bt_loss).parameters.items()
                 if p.default is not inspect.Parameter.empty]
    else:
        names = list(PAIRWISE_OBJECTIVES[method].hyperparameters())
    checks = {}
    for name in names:
        value = LOSS_VALUES.get(name)
        value = value.get(method) if isinstance(value, dict) else value
        checks[f"loss.{name}"] = [C(value)] if value is not None else []
    for name, variant, refused in LOSS_CONTEXTS.get(method, []):
        checks[f"loss.{name}"].append(C(LOSS_VALUES[name], {method} if refused else (),
                                        context=(f"loss.variant={variant}",)))
    return checks


def offline_checks(e: Env) -> dict:
    extra, reference_free = ("sft", "reward"), ("pmle", "simpo")
    data = lambda e, m: e.demos if m == "sft" else e.pairs
    return {
        "method": [], **model_checks(e), **optim_checks(),
        **data_checks(lambda e, m: e.demos_b if m == "sft" else e.pairs_b,
                      lambda e, m: f"data.train={e.demos_bad if m == 'sft' else e.pairs_bad}",
                      split_folder=lambda e, m: f"data.train={e.demos_folder if m == 'sft' else e.pairs_folder}"),
        **run_checks(),
        "train.gradient_accumulation_steps": [C("2")],
        "train.eval_every": [C("1", ALL), C("1", context=lambda e, m: (f"data.eval={data(e, m)}",))],
        "reference": [C(e.other, {*extra, *reference_free}),
                      C(e.other, methods=reference_free, context=("precompute_reference=true",))],
        "precompute_reference": [C("true", extra)], "share_prompt": [C("false", extra)],
        "group_by_length": [C("true")], "loss": [],
    }


def online_checks(e: Env) -> dict:
    not_ppo = others(["ppo"], ONLINE)
    twice = ("update_epochs=2",)
    norms = {"ppo": "sequence", "grpo": "token"}
    return {
        "method": [], **model_checks(e), **optim_checks(), **run_checks(), **generation_checks(), **reward_checks(),
        **data_checks(lambda e, m: e.prompts_b, lambda e, m: f"data.train={e.prompts_bad}",
                      refused_eval=ALL, refused_max_length=ALL,
                      split_folder=lambda e, m: f"data.train={e.prompts_folder}"),
        "train.gradient_accumulation_steps": [C("2")], "train.eval_every": [C("1", ALL)],
        "reference": [C(e.other), C(e.other, ALL, context=("loss.kl_coef=0",))],
        "loss.kl_coef": [C("0.2")], "loss.entropy_coef": [C("0.1", others(["reverse_kl"], ONLINE))],
        "loss.gamma": [C("0.5", not_ppo)], "loss.lam": [C("0.5", not_ppo)],
        "loss.whiten_advantages": [C("false", not_ppo)], "loss.vf_coef": [C("0.5", not_ppo)],
        "loss.vf_clip": [C("0.01", ALL), C("0.01", not_ppo, context=twice)],
        "loss.scale_rewards": [C("false", others(["grpo"], ONLINE))],
        "loss.clip_eps": [C("0.01", ALL), C("0.01", context=twice)],
        "loss.clip_eps_high": [C("0.01", ALL), C("0.01", context=twice)],
        "loss.length_norm": [C(lambda e, m: norms.get(m, "sequence"))],
        "update_epochs": [C("2")], "num_minibatches": [C("2")], "share_prompt": [C("false")],
        "value_init": [C("reward_model", not_ppo, extra=(f"value_model={e.rm}",))],
        "value_model": [C(e.rm, ALL), C(e.rm2, methods=("ppo",), context=("value_init=reward_model",
                                                                            f"value_model={e.rm}"))],
    }


def pairwise_checks(e: Env) -> dict:
    it, scored = set(ITERATIVE_METHODS), set(NEEDS_SCORES)
    reads_responses = set(NEEDS_PAIRS) | set(NEEDS_DEMOS)
    file_of = lambda e, m, s: (f"data.train={getattr(e, 'prompts' + s)}" if m in scored else
                               f"pairs={getattr(e, 'pairs' + s)}" if m in NEEDS_PAIRS else
                               f"demonstrations={getattr(e, 'demos' + s)}")
    return {
        "method": [], **model_checks(e), **optim_checks(), **run_checks(refused_epochs=it),
        **generation_checks(refused_all={"rpo_demos"}, refused_samples=it,
                            refused_penalty={"pmle_online", *it}),
        **reward_checks(refused=others(scored, PAIRWISE)),
        **data_checks(lambda e, m: e.prompts_b, lambda e, m: file_of(e, m, "_bad"), refused_eval=ALL,
                      refused_max_length=others(reads_responses, PAIRWISE)),
        "data.train": [C(e.prompts_b, others(scored, PAIRWISE))],
        "pairs": [C(e.pairs_b, others(NEEDS_PAIRS, PAIRWISE))],
        "demonstrations": [C(e.demos_b, others(NEEDS_DEMOS, PAIRWISE))],
        "train.gradient_accumulation_steps": [C("2", ALL)], "train.eval_every": [C("1", ALL)],
        "reference": [C(e.other, {"spin"})],
        "judge": [C("walk_rewards:judge", others(JUDGED, PAIRWISE))],
        "generation.missing_eos_penalty": [
            C("-1.0", {"pmle_online", *it}),
            C("-1.0", ALL, methods=JUDGED, context=("judge=walk_rewards:judge", "rewards=[]"))],
        "loss.beta": [C("0.3", others(["online_dpo", "spin", "spac", "rpo_demos"], PAIRWISE))],
        "loss.gamma": [C("2.0", others(["online_distill", "pmle_online"], PAIRWISE))],
        "loss.eta": [C("2.0", others(["rebel"], PAIRWISE))],
        "loss.kl_coef": [C("0.2", others(["online_distill", "rebel", "pmle_online", "nash_md_pg"], PAIRWISE))],
        "loss.mixture": [C("0.5", others(["nash_md_pg"], PAIRWISE))],
        "loss.alpha": [C("0.5", others(["spac", "rpo_demos"], PAIRWISE))],
        "update_epochs": [C("2", others(["online_dpo", "online_distill", "rebel"], PAIRWISE))],
        "iteration.iterations": [C("3", others(it, PAIRWISE), context=lambda e, m: ("train.max_steps=0",) * (m in it)),
                                 C("3", ALL, methods=tuple(it))],  # train.max_steps sets the length
        "iteration.steps_per_iteration": [C("1", others(it, PAIRWISE))],
    }


def nash_checks(e: Env) -> dict:
    values = {"n_contexts": "3", "n_responses": "5", "switch": "gamma_mismatch", "strength": "4.0", "eta": "0.3",
              "tau": "0.05", "train.max_steps": "6", "bt_beta": "0.05", "train.seed": "1"}
    return {"method": [], "train.output_dir": [C("", observe="output_dir")], **{k: [C(v)] for k, v in values.items()}}


def irl_checks(e: Env) -> dict:
    checks = {
        "method": [], **model_checks(e, refused_lora=IRL), **optim_checks("rl.optim."), **generation_checks(),
        **data_checks(lambda e, m: e.prompts_b, lambda e, m: f"demonstrations={e.demos_bad}", refused_eval=ALL),
        "reference": [C(e.other), C(e.other, ALL, context=("rl.loss.kl_coef=0",))],
        "demonstrations": [C(e.demos_b)], "pairs": [C(e.pairs_b, {"irl"})],
        **run_checks(huge_lr="rl.optim.learning_rate=1e39", lora=False),
        **{f"train.{name}": [C(value, ALL)] for name, value in (
            ("batch_size", "3"), ("gradient_accumulation_steps", "2"), ("epochs", "0.5"), ("log_every", "2"),
            ("eval_every", "1"))},  # reward.* and rl.* set the batches and steps
        "train.max_steps": [C("2")],
        # save_every counts reward steps (rollouts checkpoint in iter-t/rl, removed after the round); with one
        # reward step per round, or the default two checkpoints kept, the end state shows no difference
        "train.save_every": [C("1", context=("reward.steps=2", "train.keep_checkpoints=0"))],
        "iterations": [C("3", context=("train.max_steps=0",)), C("3", ALL)],  # train.max_steps sets the length
        "reward.steps": [C("2")], "reward.batch_size": [C("3")], "reward.learning_rate": [C("1e-2")],
        "reward.weight_decay": [C("0.5")], "reward.max_grad_norm": [C("1e-4")], "reward.demo_weight": [C("0.5")],
        "reward.alpha": [C("0.5", {"irl"})], "reward.reinit": [C("true", context=("train.max_steps=6",))],
        "reward.init": [C(e.other)],
        "rl.method": [C("grpo")], "rl.steps": [C("1")],  # 3 would not show within train.max_steps=3
        "rl.batch_size": [C("3")],
        "rl.update_epochs": [C("2")], "rl.num_minibatches": [C("2")], "rl.loss.kl_coef": [C("0.2")],
        "rl.loss.length_norm": [C("sequence")],
    }
    for name, value, method in (("entropy_coef", "0.1", "reverse_kl"), ("gamma", "0.5", "ppo"),
                                ("lam", "0.5", "ppo"), ("whiten_advantages", "false", "ppo"),
                                ("vf_coef", "0.5", "ppo"), ("scale_rewards", "false", "grpo")):
        checks[f"rl.loss.{name}"] = [C(value, ALL), C(value, context=(f"rl.method={method}",))]
    for name in ("clip_eps", "clip_eps_high", "vf_clip"):
        method = "ppo" if name == "vf_clip" else "rloo"
        checks[f"rl.loss.{name}"] = [C("0.01", ALL),
                                     C("0.01", context=(f"rl.method={method}", "rl.update_epochs=2"))]
    return checks


@dataclass
class Family:
    """A config schema, its methods and how to run one. `groups` are the methods that share one code path
    for every field they all treat alike: a uniform check (`Check.uniform`) runs on each group's first
    method; a check whose expectation differs by method runs on every method."""
    schema: type
    methods: tuple
    checks: Callable
    base: Callable          # (env, method, out) -> overrides
    train: Callable         # (cfg, method) -> result
    groups: tuple = ()
    output_key: str = "train.output_dir"

    def representative(self, method: str) -> bool:
        return not any(method in group and method != group[0] for group in self.groups)


def offline_base(e, m, out):
    return [f"method={m}", f"model.name_or_path={e.policy}", f"data.train={e.demos if m == 'sft' else e.pairs}",
            "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.progress_bar=false",
            "optim.learning_rate=1e-2", f"train.output_dir={out}"]


def online_base(e, m, out):
    return [f"method={m}", f"model.name_or_path={e.policy}", f"data.train={e.prompts}", f"rewards={REWARD}",
            "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.progress_bar=false",
            "optim.learning_rate=1e-2", "generation.max_new_tokens=3", "generation.temperature=1.0",
            "generation.num_samples=2", f"train.output_dir={out}"]


def pairwise_base(e, m, out):
    fields = [f"method={m}", f"model.name_or_path={e.policy}", "train.batch_size=2", "train.log_every=1",
              "train.progress_bar=false", "optim.learning_rate=1e-2", f"train.output_dir={out}"]
    fields += [f"data.train={e.prompts}", f"rewards={REWARD}"] if m in NEEDS_SCORES else []
    fields += [f"pairs={e.pairs}"] if m in NEEDS_PAIRS else []
    fields += [f"demonstrations={e.demos}"] if m in NEEDS_DEMOS else []
    fields += ["train.max_steps=2"] + (["iteration.steps_per_iteration=2"] if m in ITERATIVE_METHODS else [])
    fields += ["generation.max_new_tokens=3", "generation.temperature=1.0"] if m != "rpo_demos" else []
    return fields


def irl_base(e, m, out):
    pairs = [f"pairs={e.pairs}"] if m == "aihf" else []
    return [f"method={m}", f"model.name_or_path={e.policy}", f"demonstrations={e.demos}", *pairs,
            "train.max_steps=3", "reward.steps=1", "reward.batch_size=2", "rl.steps=2", "rl.batch_size=2",
            "rl.optim.learning_rate=1e-2", "train.progress_bar=false",
            "generation.max_new_tokens=3", "generation.num_samples=2", "generation.temperature=1.0",
            f"train.output_dir={out}"]


def train_offline_(cfg, m):
    from distalign.training.offline import train_offline
    return train_offline(cfg, log=lambda *a: None)


def train_online_(cfg, m):
    from distalign.training.online import train_online
    return train_online(cfg, log=lambda *a: None)


def train_pairwise_(cfg, m):
    from distalign.training.iterative import train_iterative
    from distalign.training.online_pairwise import train_online_pairwise
    return (train_iterative if m in ITERATIVE_METHODS else train_online_pairwise)(cfg, log=lambda *a: None)


def train_nash_(cfg, m):
    from distalign.training.nash import train_nash
    return train_nash(cfg)


def train_irl_(cfg, m):
    from distalign.training.irl import train_irl
    return train_irl(cfg, log=lambda *a: None)


# Code paths: offline pairwise objectives with / without a reference share PairwiseTask; Online engine I
# differs by value head (ppo), KL in the loss (grpo) or neither; the online pairwise loop's
# online_dpo / online_distill / rebel share `train_step`; spin and spac sample, rpo_demos does not.
FAMILIES = {
    "offline": Family(OfflineConfig, OFFLINE, offline_checks, offline_base, train_offline_,
                      groups=(("dpo", "ipo", "hinge", "robust_dpo", "rpo", "cpo"), ("pmle", "simpo"))),
    "online": Family(OnlineConfig, ONLINE, online_checks, online_base, train_online_,
                     groups=(("rloo", "reinforce", "reverse_kl"),)),
    "online_pairwise": Family(OnlinePairwiseConfig, PAIRWISE, pairwise_checks, pairwise_base, train_pairwise_,
                              groups=(("online_dpo", "online_distill", "rebel"), ("spin", "spac"))),
    "nash": Family(NashConfig, ("nash_md",), nash_checks, lambda e, m, out: [f"method={m}", "train.max_steps=5",
                                                                           f"train.output_dir={out}"], train_nash_),
    "irl": Family(IRLConfig, IRL, irl_checks, irl_base, train_irl_, groups=(("aihf", "irl"),)),
}


def walk_family(name: str, e: Env, monkeypatch, tmp: Path) -> tuple[list[str], int]:
    family = FAMILIES[name]
    checks = family.checks(e)
    failures = coverage_failures(family, checks)
    spies = Spies(monkeypatch)
    walk = Walk(family, e, spies, monkeypatch, tmp)
    try:
        for method in family.methods:
            own = {**checks, **(offline_loss_fields(method) if name == "offline" else {})}
            for field, field_checks in own.items():
                if field in ("method", "loss"):
                    continue
                applicable = [c for c in field_checks if c.applies(method)]
                if not applicable:
                    failures.append(f"{family.schema.__name__} {method}: add a check for field {field}")
                probed = [c for c in applicable if not c.uniform() or family.representative(method)]
                failures += [f for c in probed if (f := probe(walk, method, field, c))]
        defaults = {m: walk.baseline(m, ()) for m in family.methods}
        same = [(a, b) for i, a in enumerate(family.methods) for b in family.methods[i + 1:]
                if defaults[a] == defaults[b]]
        failures += [f"{family.schema.__name__}: method {a} and {b} ran identically" for a, b in same]
    finally:
        spies.close()
    return failures, walk.count


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_field_changes_something_or_is_refused(env, monkeypatch, tmp_path, name):
    failures, runs = walk_family(name, env, monkeypatch, tmp_path)
    assert not failures, f"{len(failures)} of the field walk's checks failed ({runs} runs):\n" + "\n".join(failures)


class Anything(Env):
    def __getattr__(self, name):
        return "x"


def test_the_walk_asks_for_a_check_of_every_new_field():
    """A field added to a schema without a check fails the walk, naming the field."""
    import dataclasses

    @dataclass
    class Extended(OnlineConfig):
        brand_new: int = 0

    family = dataclasses.replace(FAMILIES["online"], schema=Extended)
    assert coverage_failures(family, online_checks(Anything())) == ["Extended: add a check for field brand_new"]
    for name, family in FAMILIES.items():
        assert coverage_failures(family, family.checks(Anything())) == [], name


# -- what the walk found, each pinned by its own test ---------------------------------------------------

@pytest.mark.parametrize("method", ["online_distill", "rebel", "online_dpo", "nash_md_pg"])
def test_missing_eos_penalty_is_added_to_the_online_pairwise_rewards(env, tmp_path, method):
    """It used to reach only Online engine I: these methods accepted it and trained bit for bit the same.
    The first step samples the same completions with and without it, so the logged mean reward must drop
    by exactly |penalty| x the fraction of completions without EOS."""
    first = {}
    for penalty in ("none", "-1.0"):
        extra = [] if penalty == "none" else [f"generation.missing_eos_penalty={penalty}"]
        cfg = load_config(OnlinePairwiseConfig, None, [*pairwise_base(env, method, tmp_path / penalty),
                                                       "train.max_steps=1", *extra])
        first[penalty] = train_pairwise_(cfg, method)["history"][0]
    with_penalty, without = first["-1.0"], first["none"]
    assert with_penalty["train/reward_mean"] < without["train/reward_mean"]
    truncated = with_penalty["train/truncated_fraction"]
    assert 0 < truncated < 1 and truncated == without["train/truncated_fraction"]
    assert with_penalty["train/reward_mean"] == pytest.approx(without["train/reward_mean"] - truncated, abs=1e-6)


def test_ppo_trains_without_a_kl_term(env, tmp_path):
    """kl_coef = 0 loads no reference; PPO's per-token reward used to subtract the missing log-probs."""
    cfg = load_config(OnlineConfig, None, [*online_base(env, "ppo", tmp_path), "loss.kl_coef=0"])
    history = train_online_(cfg, "ppo")["history"]
    assert len(history) == 2 and "train/kl" not in history[0]


def test_nested_sections_keep_their_schemas_factory_defaults():
    """OnlinePairwiseConfig's generation defaults to 2 samples (IRLConfig's to temperature 1); the loader
    used to rebuild a section from its class defaults (4 samples, temperature 0.7) whether or not the
    file gave some of its keys."""
    base = ["model.name_or_path=m", "data.train=p.jsonl", "rewards=[{kind: regex, pattern: a}]", "method=rebel"]
    assert load_config(OnlinePairwiseConfig, None, base).generation.num_samples == 2
    assert load_config(OnlinePairwiseConfig, None, [*base, "generation.max_new_tokens=3"]).generation.num_samples == 2
    irl = load_config(IRLConfig, None, ["method=irl", "model.name_or_path=m", "demonstrations=d.jsonl"])
    assert irl.generation.temperature == 1.0 and irl.generation.num_samples == 4


def test_runs_in_one_process_may_change_mixed_precision():
    """accelerate refuses a second AcceleratorState with another mixed_precision; each run starts its own."""
    from distalign.training.common import make_accelerator
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
