"""kill -9 / resume trials: a run killed at a random moment (mid-step, mid-checkpoint, mid-final-save) and
resumed, as often as it takes, must end with final weights bit-identical to an uninterrupted run.

    PYTHONPATH=src python tests/kill_resume.py --trials 20            # every method in turn, ~10 min
    PYTHONPATH=src python tests/kill_resume.py --methods sft,grpo --trials 4 --work /tmp/kr

Each trial runs `distalign train METHOD` as a subprocess on a tiny Llama (checkpoints every step), waits
until training has started, kills it with SIGKILL after a random share of the uninterrupted run's
training time (or as soon as it writes a checkpoint, or has logged its k-th step), and restarts it: with `train.resume=true` when a checkpoint exists, else with
`train.overwrite=true` (killed before the first checkpoint). One or two kills per trial. At the end:
final/model.safetensors equals the uninterrupted run's bit for bit, no temp checkpoint folder is left,
and metrics.jsonl logs no step twice. tests/test_kill_resume.py runs a few trials; this prints the counts.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REWARD_MODULE = '''
def vowels(prompts, completions, **_):
    """The fraction of completion characters that are vowels."""
    return [sum(ch in "aeiou" for ch in s) / max(1, len(s)) for s in completions]
'''

COMMON = ("train.progress_bar=false", "train.save_every=1", "train.keep_checkpoints=2", "train.report_to=none")
OPTIM = ("optim.learning_rate=1e-3", "optim.warmup_steps=0")
REWARD = "rewards=[{kind: callable, path: 'kr_rewards:vowels'}]"
SAMPLING = ("generation.max_new_tokens=6", "generation.temperature=1.0")


def method_overrides(method: str, data: Path) -> list[str]:
    """The command-line settings of one method's run on the workspace's data."""
    offline = {"sft": "demonstrations", "dpo": "pairs", "ipo": "pairs"}
    if method in offline:
        return [f"data.train={data / offline[method]}.jsonl", "train.batch_size=4", "train.max_steps=10", *OPTIM]
    if method in ("grpo", "rloo", "ppo"):
        extra = ["update_epochs=2", "num_minibatches=2"] if method == "ppo" else []
        return [f"data.train={data / 'prompts.jsonl'}", REWARD, "train.batch_size=4", "generation.num_samples=4",
                "train.max_steps=6", *SAMPLING, *OPTIM, *extra]
    if method in ("online_dpo", "rebel"):
        return [f"data.train={data / 'prompts.jsonl'}", REWARD, "train.batch_size=4", "generation.num_samples=2",
                "train.max_steps=6", *SAMPLING, *OPTIM]
    pairs = [f"pairs={data / 'pairs.jsonl'}"] if method in ("spac", "rpo_demos", "aihf") else []  # the others read none
    if method in ("spin", "spac", "rpo_demos"):
        sampling = list(SAMPLING) if method != "rpo_demos" else []  # rpo_demos draws no samples
        return [f"demonstrations={data / 'demonstrations.jsonl'}", *pairs, "train.batch_size=8", "train.max_steps=6",
                "iteration.steps_per_iteration=3", *sampling, *OPTIM]
    if method in ("irl", "aihf"):
        return [f"demonstrations={data / 'demonstrations.jsonl'}", *pairs, f"data.train={data / 'prompts.jsonl'}", "train.max_steps=8", "reward.steps=2", "rl.steps=2",
                "reward.batch_size=8", "rl.batch_size=4", "generation.num_samples=2", "reward.learning_rate=1e-3",
                "rl.optim.learning_rate=1e-3", *SAMPLING]
    raise ValueError(f"kill_resume: no settings for method {method!r}")


def logged_every_step(method: str) -> list[str]:
    """Every step logged (the kill moments wait for metrics lines); irl / aihf always log every step."""
    return [] if method in ("irl", "aihf") else ["train.log_every=1"]


METHODS = ("sft", "dpo", "grpo", "ppo", "rloo", "online_dpo", "rebel", "spin", "spac", "rpo_demos", "irl", "aihf")


def build_workspace(root: Path) -> Path:
    """The tiny world's data, a tiny Llama whose tokenizer knows its words, and the reward module."""
    from distalign.models import make_tiny
    from distalign.testbed.lm import LMWorld
    from distalign.testbed.lm_data import write_world_datasets
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "tiny" / "config.json").is_file():
        world = LMWorld.create(seed=0)
        write_world_datasets(world, root / "data", n_pairs=96, n_demos=96, n_prompts=32, seed=0)
        make_tiny(root / "tiny", arch="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=300,
                  corpus=world.corpus(), seed=0)
    (root / "kr_rewards.py").write_text(REWARD_MODULE)
    return root


def start(method: str, root: Path, out: Path, *extra: str) -> subprocess.Popen:
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(root), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "distalign", "train", method, f"model.name_or_path={root / 'tiny'}",
               f"train.output_dir={out}", *COMMON, *logged_every_step(method), *method_overrides(method, root / "data"), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {err.strip().splitlines()[-1:] if err else ''}")


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


@dataclass
class Reference:
    weights: dict
    train_seconds: float   # from the first metrics line to the end of the process


def wait_for_training(proc: subprocess.Popen, out: Path) -> float:
    """Block until the run has logged its first step (or ended); returns when that happened."""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size > 0):
        time.sleep(0.02)
    return time.perf_counter()


def wait_for_checkpoint_write(proc: subprocess.Popen, out: Path, skip: int) -> None:
    """Block until the run is writing a checkpoint (a temp folder exists), letting `skip` writes pass."""
    seen = set()
    while proc.poll() is None:
        writing = temp_folders(out)
        if writing - seen:
            if len(seen) >= skip:
                return
            seen |= writing
        time.sleep(0.001)


def reference_run(method: str, root: Path) -> Reference:
    out = root / "runs" / f"{method}-reference"
    proc = start(method, root, out, "train.overwrite=true")
    began = wait_for_training(proc, out)
    finish(proc, f"{method} reference run")
    return Reference(final_weights(out), time.perf_counter() - began)


@dataclass
class Trial:
    method: str
    kills: int = 0
    resumes: int = 0
    kills_mid_checkpoint: int = 0
    equal: bool = False
    problems: list = field(default_factory=list)


def logged_twice(out: Path) -> list[int]:
    """Steps that metrics.jsonl logs training (train/ or reward/) metrics for more than once."""
    seen, twice = set(), []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(k.startswith(("train/", "reward/")) for k in record):
            if record["step"] in seen:
                twice.append(record["step"])
            seen.add(record["step"])
    return twice


def temp_folders(out: Path) -> set[str]:
    from distalign.training.checkpoint import TMP_PREFIX
    return {p.name for p in out.iterdir() if p.name.startswith(TMP_PREFIX)} if out.is_dir() else set()


def random_kills(rng: random.Random, reference: Reference) -> list[tuple[str, float]]:
    """One or two kills, each ("time", seconds into training), ("checkpoint", writes to let pass: the kill
    lands inside a checkpoint write when the poll sees its temp folder) or ("step", metrics lines to wait for)."""
    def one():
        kind = rng.choice(("time", "time", "checkpoint", "step"))
        return (kind, rng.uniform(0, reference.train_seconds) if kind == "time" else rng.randint(1, 4))
    return [one() for _ in range(rng.choice((1, 1, 2)))]


def wait_for_lines(proc: subprocess.Popen, out: Path, lines: int) -> None:
    """Block until metrics.jsonl holds `lines` lines (or the run ended)."""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and (not metrics.is_file() or metrics.read_bytes().count(b"\n") < lines):
        time.sleep(0.002)


def run_trial(method: str, root: Path, index: int, reference: Reference, rng: random.Random,
              kills: list[tuple[str, float]] | None = None) -> Trial:
    """Kill the run as `kills` says (default: `random_kills`), resume until it finishes, compare."""
    from distalign.training.checkpoint import latest_checkpoint
    out = root / "runs" / f"{method}-{index}"
    trial, extra = Trial(method), ["train.overwrite=true"]
    pending = list(kills if kills is not None else random_kills(rng, reference))
    for _ in range(len(pending) + 3):
        stale = temp_folders(out)  # left by an earlier kill; removed when the run starts
        proc = start(method, root, out, *extra)
        if pending:
            kind, when = pending.pop(0)
            wait_for_training(proc, out)
            if kind == "checkpoint":
                wait_for_checkpoint_write(proc, out, int(when))
            elif kind == "step":
                wait_for_lines(proc, out, int(when))
            else:
                time.sleep(when)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                trial.kills += 1
                trial.kills_mid_checkpoint += bool(temp_folders(out) - stale)
                resume = latest_checkpoint(out) is not None
                trial.resumes += resume
                extra = ["train.resume=true"] if resume else ["train.overwrite=true"]
                continue
        finish(proc, f"{method} trial {index}")
        break
    weights = final_weights(out)
    trial.equal = weights.keys() == reference.weights.keys() and all(
        bool((weights[k] == reference.weights[k]).all()) for k in weights)
    if not trial.equal:
        trial.problems.append("final weights differ from the uninterrupted run")
    if temp_folders(out):
        trial.problems.append("a temp checkpoint folder was left behind")
    if twice := logged_twice(out):
        trial.problems.append(f"metrics.jsonl logs steps {twice[:5]} twice")
    return trial


def run_trials(methods: list[str], trials: int, root: Path, seed: int = 0, log=print) -> list[Trial]:
    """`trials` trials spread over `methods` in turn (one uninterrupted reference run per method)."""
    rng = random.Random(seed)
    build_workspace(root)
    references, results = {}, []
    for index in range(trials):
        method = methods[index % len(methods)]
        if method not in references:
            references[method] = reference_run(method, root)
        results.append(run_trial(method, root, index, references[method], rng))
        t = results[-1]
        log(f"trial {index + 1:2d} {method:10s} kills {t.kills} (mid-checkpoint {t.kills_mid_checkpoint}), "
            f"resumes {t.resumes}: {'bitwise equal' if t.equal else 'DIFFERENT'} {'; '.join(t.problems)}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--work", default=None, help="workspace folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import tempfile
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kill_resume-"))
    results = run_trials(args.methods.split(","), args.trials, root, args.seed)
    good = sum(t.equal and not t.problems for t in results)
    print(f"kill -9 / resume trials: {len(results)} ({sum(t.kills > 0 for t in results)} killed at least once; "
          f"the others ended before their kill); bitwise equal and clean: {good}; kills: "
          f"{sum(t.kills for t in results)} ({sum(t.kills_mid_checkpoint for t in results)} during a checkpoint "
          f"write); resumes from a checkpoint: {sum(t.resumes for t in results)}; workspace {root}")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
