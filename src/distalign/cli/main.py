"""`distalign` command line: parse -> config -> the layer that does the work. Nothing imports this."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Callable

def method_families() -> list[tuple[tuple[str, ...], type, Callable]]:
    """(methods, config schema, trainer) for every family; imported lazily so `--help` stays fast."""
    from distalign.config import OfflineConfig
    from distalign.config.irl import IRL_METHODS, IRLConfig
    from distalign.config.online import ONLINE_METHODS, OnlineConfig
    from distalign.config.online_pairwise import (ITERATIVE_METHODS, LOOP_METHODS, NashConfig,
                                                  OnlinePairwiseConfig)
    from distalign.objectives import PAIRWISE_OBJECTIVES

    def lazy(module: str, name: str) -> Callable:
        return lambda cfg: getattr(importlib.import_module(module), name)(cfg)

    return [(("sft", "reward", *PAIRWISE_OBJECTIVES), OfflineConfig, lazy("distalign.training.offline", "train_offline")),
            (ONLINE_METHODS, OnlineConfig, lazy("distalign.training.online", "train_online")),
            (LOOP_METHODS, OnlinePairwiseConfig, lazy("distalign.training.online_pairwise", "train_online_pairwise")),
            (ITERATIVE_METHODS, OnlinePairwiseConfig, lazy("distalign.training.iterative", "train_iterative")),
            (("nash_md",), NashConfig, lazy("distalign.training.nash", "train_nash")),
            (IRL_METHODS, IRLConfig, lazy("distalign.training.irl", "train_irl"))]


def cmd_train(args) -> int:
    from distalign.config import field_help, load_config
    families = method_families()
    for methods, schema, trainer in families:
        if args.method in methods:
            break
    else:
        valid = ", ".join(m for methods, _, _ in families for m in methods)
        raise SystemExit(f"distalign: error: unknown method {args.method!r}; valid: {valid}")
    if args.list_fields:
        for name, help_text, default in field_help(schema):
            print(f"{name:38s} {help_text} [default: {default}]")
        return 0
    cfg = load_config(schema, args.config, [*args.overrides, f"method={args.method}"])
    result = trainer(cfg)
    where = result.get("final_model") or result.get("output_dir") or getattr(cfg, "output_dir", None) \
        or cfg.train.output_dir
    print(f"done: {where}")
    return 0


def cmd_make_tiny(args) -> int:
    from distalign.models.tiny import make_tiny, make_tiny_reward_model
    kwargs = dict(arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
                  num_heads=args.num_heads, vocab_size=args.vocab_size, seed=args.seed)
    path = (make_tiny_reward_model if args.reward else make_tiny)(args.out, **kwargs)
    print(f"wrote {path}")
    return 0


CONFIGURABLE_EXPERIMENTS = ("mixed-feedback",)


def cmd_testbed(args) -> int:
    from distalign.testbed.experiments import EXPERIMENTS, run_all, run_experiment
    out = Path(args.out)
    if args.config:
        if args.name not in CONFIGURABLE_EXPERIMENTS:
            raise SystemExit(f"distalign: error: --config: only {', '.join(CONFIGURABLE_EXPERIMENTS)} "
                             f"takes a config file, not {args.name!r}")
        from distalign.config import load_config
        from distalign.config.testbed import MixedFeedbackConfig
        run_experiment(args.name, out, config=load_config(MixedFeedbackConfig, args.config, args.overrides))
    elif args.overrides:
        raise SystemExit(f"distalign: error: key=value overrides {args.overrides} need --config")
    elif args.name == "all":
        run_all(out, quick=args.quick, seed=args.seed)
    elif args.name in EXPERIMENTS:
        run_experiment(args.name, out, quick=args.quick, seed=args.seed)
    else:
        raise SystemExit(f"distalign: error: unknown experiment {args.name!r}; valid: all, {', '.join(EXPERIMENTS)}")
    print(f"results in {out}")
    return 0


def cmd_eval(args) -> int:
    from distalign.config import read_yaml, apply_override
    from distalign.evaluation import evaluate
    tree = read_yaml(args.config)
    for assignment in args.overrides:
        apply_override(tree, assignment)
    result = evaluate(tree)
    print(f"wrote {Path(tree['output_dir']) / 'eval.md'}")
    return 0 if result is not None else 1


def cmd_demo(args) -> int:
    from distalign.demo import run_demo
    run_demo(out_dir=args.out, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distalign", description=(
        "Align language models with preference feedback, treated as distribution learning."))
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build the embedded world, train every method, evaluate, write a report")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one method from a YAML config: distalign train dpo --config c.yaml k=v")
    p.add_argument("method", help="sft, reward, a pairwise objective (dpo, cpo, pmle, ...) or an online method")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--list-fields", action="store_true", help="list every config field with its help and exit")
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
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("testbed", help="ground-truth experiments: rate, rkl-optimum, dpo-degeneracy, ... or all")
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML config (mixed-feedback: methods, beta, step counts, seed, quick)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the --config file")
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("eval", help="evaluate models: KL to reference, RM score, win-rate, judge")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_eval)
    return parser


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
        return args.func(args)
    except KeyboardInterrupt:
        print("distalign: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as err:
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"distalign: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
