"""The run-folder contract (training/checkpoint.py `begin_run`): bad resumes and reused folders are refused
with one line and exit code 2 and leave everything saved as it was; damaged checkpoints fall back to the
one before; metrics are not logged twice; the iterative and IRL loops resume bit for bit."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import offline_overrides
from safetensors.torch import load_file

from distalign.cli.main import main
from distalign.models import make_tiny


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with a hash of its bytes (and every folder), to show nothing changed."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def train(capsys, method: str, *args: str) -> tuple[int, str, str]:
    code = main(["train", method, *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("distalign: error:")]
    assert len(lines) == 1, err
    return lines[0]


def dpo(world_dir: Path, out: Path, *extra: str) -> list[str]:
    return offline_overrides(world_dir, "dpo", out, "train.max_steps=4", "train.save_every=2",
                             "train.report_to=none", *extra)


@pytest.fixture(scope="module")
def base(world_dir, tmp_path_factory):
    """A finished DPO run: checkpoint-2, checkpoint-4, final/, metrics.jsonl; and a model of the same shape."""
    root = tmp_path_factory.mktemp("contract")
    code = main(["train", "dpo", *dpo(world_dir, root / "base")])
    assert code == 0
    from distalign.testbed.lm import LMWorld
    make_tiny(root / "other", arch="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=300,
              corpus=LMWorld.create(seed=0).corpus(), seed=1)
    rows = (world_dir / "data" / "pairs.jsonl").read_text().splitlines()
    (root / "fewer_pairs.jsonl").write_text("\n".join(rows[:-8]) + "\n")
    return root


@pytest.fixture
def run(base, tmp_path):
    """A copy of the finished run to spoil."""
    shutil.copytree(base / "base", tmp_path / "run")
    return tmp_path / "run"


REFUSED = [
    ("other method", ["method=ipo"], "differs from the checkpoint's in method (dpo -> ipo)"),
    ("objective", ["loss.beta=0.2"], "loss.beta (0.1 -> 0.2)"),
    ("global batch", ["train.batch_size=2"], "global_batch (4 -> 2)"),
    ("seed", ["train.seed=1"], "train.seed (0 -> 1)"),
    ("fewer steps", ["train.max_steps=3", "train.resume_allow=[max_steps]"], "below the checkpoint's step 4"),
    ("more steps, not allowed", ["train.max_steps=6"], "max_steps (4 -> 6)"),
    ("unknown allowance", ["train.resume_allow=[bogus]"], "train.resume_allow: unknown field 'bogus'"),
]


@pytest.mark.parametrize("name, extra, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_resume_that_differs_from_the_checkpoint_is_refused(world_dir, run, capsys, name, extra, message):
    before = snapshot(run)
    method = next((e.split("=")[1] for e in extra if e.startswith("method=")), "dpo")
    code, _, err = train(capsys, method, *dpo(world_dir, run, "train.resume=true"), *extra)
    assert code == 2 and message in one_error_line(err), err
    assert snapshot(run) == before


def test_another_model_of_the_same_shape_is_refused(world_dir, base, run, capsys):
    before = snapshot(run)
    code, _, err = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true", f"model.name_or_path={base / 'other'}",
                                             "train.resume_allow=[model.name_or_path]"))
    line = one_error_line(err)
    assert code == 2 and "model.weights (" in line and "model.name_or_path" not in line.split("differs")[1], line
    assert snapshot(run) == before


def test_other_data_is_refused(world_dir, base, run, capsys):
    before = snapshot(run)
    code, _, err = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true", f"data.train={base / 'fewer_pairs.jsonl'}"))
    assert code == 2 and "data.train (" in one_error_line(err)
    assert snapshot(run) == before


def test_resume_without_a_checkpoint_is_an_error(world_dir, run, tmp_path, capsys):
    code, _, err = train(capsys, "dpo", *dpo(world_dir, tmp_path / "never", "train.resume=true"))
    assert code == 2 and "has no checkpoint to resume from" in one_error_line(err)
    assert not (tmp_path / "never").exists()
    for checkpoint in run.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    before = snapshot(run)
    code, _, err = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true"))
    assert code == 2 and "has no checkpoint to resume from" in one_error_line(err)
    assert snapshot(run) == before


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(world_dir, run, capsys):
    before = snapshot(run)
    code, _, err = train(capsys, "dpo", *dpo(world_dir, run))
    line = one_error_line(err)
    assert code == 2 and "already holds a run" in line and "train.overwrite=true" in line
    assert snapshot(run) == before
    code, _, err = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true", "train.overwrite=true"))
    assert code == 2 and "field 'train.overwrite': cannot be combined with resume=true" in one_error_line(err)
    assert snapshot(run) == before


def test_every_checkpoint_damaged_is_an_error_naming_the_file(world_dir, run, capsys):
    for checkpoint in run.glob("checkpoint-*"):
        (checkpoint / "state.json").write_text("{not json")
    before = snapshot(run)
    code, _, err = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true"))
    line = one_error_line(err)
    assert code == 2 and "is readable" in line and "checkpoint-4/state.json: not a readable checkpoint state" in line
    assert snapshot(run) == before


DAMAGE = {
    "truncated model": ("model.safetensors", lambda b: b[:len(b) // 2], "model.safetensors: truncated"),
    "corrupt state.json": ("state.json", lambda b: b[:-7], "state.json: not a readable checkpoint state"),
    "random optimizer bytes": ("optimizer.safetensors", lambda b: bytes(reversed(b)),
                               "optimizer.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(world_dir, base, run, capsys, damage):
    name, spoil, message = DAMAGE[damage]
    file = run / "checkpoint-4" / name
    file.write_bytes(spoil(file.read_bytes()))
    shutil.rmtree(run / "final")
    code, out, _ = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true"))
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1 and message in warnings[0], out
    assert "resumed from" in out and "checkpoint-2 at step 2" in out
    expected, got = load_file(str(base / "base" / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_cuts_metrics_back_and_clears_temp_folders(world_dir, base, run, capsys):
    """A kill after step 4 was logged but before its checkpoint: the resume from checkpoint-2 logs 3 and 4
    once, and removes a half-written checkpoint folder."""
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final")
    (run / ".tmp-checkpoint-4-x").mkdir()
    (run / ".tmp-checkpoint-4-x" / "model.safetensors").write_bytes(b"partial")
    code, _, _ = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true"))
    assert code == 0 and not list(run.glob(".tmp-*"))
    assert (run / "metrics.jsonl").read_text() == (base / "base" / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [1, 2, 3, 4]


def test_more_steps_when_allowed_and_overwrite_replaces_the_run(world_dir, run, capsys):
    code, _, _ = train(capsys, "dpo", *dpo(world_dir, run, "train.resume=true", "train.max_steps=6",
                                           "train.resume_allow=[max_steps]"))
    train_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if "train/loss" in r]
    assert code == 0 and train_steps == [1, 2, 3, 4, 5, 6]
    (run / "checkpoint-99").mkdir()
    code, _, _ = train(capsys, "dpo", *dpo(world_dir, run, "train.overwrite=true"))
    assert code == 0 and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line] == [1, 2, 3, 4]


def test_final_holds_the_model_only(base):
    final = sorted(p.name for p in (base / "base" / "final").iterdir())
    assert "model.safetensors" in final and "config.json" in final and "tokenizer.json" in final
    assert not [name for name in final if "optimizer" in name or "rng" in name or name == "state.json"]
    assert (base / "base" / "checkpoint-4" / "optimizer.safetensors").is_file()


def iterative_args(world_dir, method, out, *extra):
    data = world_dir / "data"
    pairs = [f"pairs={data / 'pairs.jsonl'}"] if method in ("spac", "rpo_demos") else []  # spin reads none
    return [f"model.name_or_path={world_dir / 'tiny'}", f"demonstrations={data / 'demonstrations.jsonl'}",
            *pairs, f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=6",
            "iteration.steps_per_iteration=3", "generation.max_new_tokens=6", "generation.temperature=1.0",
            "optim.learning_rate=1e-3", "train.progress_bar=false", "train.report_to=none", *extra]


class Crash(RuntimeError):
    """Stands in for a kill in the middle of a run."""


def crash_at(monkeypatch, owner, name, calls: int):
    """Make `owner.name` raise Crash on its `calls`-th call (a crash mid-run, after earlier checkpoints)."""
    real, count = getattr(owner, name), {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise Crash("simulated kill")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("method", ["spin", "spac"])
def test_iterative_methods_resume_bitwise_inside_a_round(world_dir, tmp_path, monkeypatch, method):
    """Crash at step 5 (inside round 2, after checkpoint-4): the resume restores the round's samples and
    (spin) its reference pi_t, and ends with the uninterrupted run's weights and losses."""
    from distalign.config import load_config
    from distalign.config.online_pairwise import OnlinePairwiseConfig
    from distalign.training import iterative

    def cfg(out, *extra):
        return load_config(OnlinePairwiseConfig, None, [f"method={method}", *iterative_args(world_dir, method, out,
                                                                                            *extra)])
    straight = iterative.train_iterative(cfg(tmp_path / "straight"), log=lambda *_: None)
    with monkeypatch.context() as patch:
        crash_at(patch, iterative.IterativeTrainer, "step_loss", 5)
        with pytest.raises(Crash):
            iterative.train_iterative(cfg(tmp_path / "split", "train.save_every=2"), log=lambda *_: None)
    assert (tmp_path / "split" / "checkpoint-4").is_dir()
    resumed = iterative.train_iterative(cfg(tmp_path / "split", "train.save_every=2", "train.resume=true"),
                                        log=lambda *_: None)
    a, b = load_file(straight["final_model"] + "/model.safetensors"), load_file(resumed["final_model"] + "/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train/loss"] for h in straight["history"][4:]] == [h["train/loss"] for h in resumed["history"]]


def test_an_iterative_run_that_ended_inside_a_round_trains_further_bitwise(world_dir, tmp_path):
    """spin, rounds of 3: a 2-step run, resumed to 5 steps with train.resume_allow=[max_steps], continues
    round 1 with its samples and pi_t and ends as a straight 5-step run (constant schedule: the step
    count does not enter the learning rate)."""
    from distalign.config import load_config
    from distalign.config.online_pairwise import OnlinePairwiseConfig
    from distalign.training.iterative import train_iterative

    def run(out, *extra):
        args = iterative_args(world_dir, "spin", out, "optim.schedule=constant", *extra)
        return train_iterative(load_config(OnlinePairwiseConfig, None, ["method=spin", *args]), log=lambda *_: None)
    straight = run(tmp_path / "straight", "train.max_steps=5")
    run(tmp_path / "more", "train.max_steps=2")
    more = run(tmp_path / "more", "train.max_steps=5", "train.resume=true", "train.resume_allow=[max_steps]")
    a, b = load_file(straight["final_model"] + "/model.safetensors"), load_file(more["final_model"] + "/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_irl_resumes_bitwise_in_the_reward_step_and_in_the_rl_step(world_dir, tmp_path, monkeypatch):
    """aihf, 2 rounds of 2 reward steps + 2 rollouts: a crash in round 2's reward step, then one in its
    RL step; each resume continues from the last checkpoint and the final policy is the uninterrupted one."""
    from distalign.config import load_config
    from distalign.config.irl import IRLConfig
    from distalign.training import irl, online
    data = world_dir / "data"

    def cfg(out, *extra):
        return load_config(IRLConfig, None, [
            "method=aihf", f"model.name_or_path={world_dir / 'tiny'}", f"demonstrations={data / 'demonstrations.jsonl'}",
            f"pairs={data / 'pairs.jsonl'}", f"data.train={data / 'prompts.jsonl'}", f"train.output_dir={out}",
            "iterations=2", "reward.steps=2", "rl.steps=2", "reward.batch_size=8", "rl.batch_size=4",
            "generation.num_samples=2", "generation.max_new_tokens=6", "generation.temperature=1.0",
            "train.progress_bar=false", "train.report_to=none", "train.save_every=1", *extra])
    straight = irl.train_irl(cfg(tmp_path / "straight"), log=lambda *_: None)
    split = tmp_path / "split"
    with monkeypatch.context() as patch:
        crash_at(patch, irl.RewardLearner, "step", 4)          # round 2's second reward step
        with pytest.raises(Crash):
            irl.train_irl(cfg(split), log=lambda *_: None)
    with monkeypatch.context() as patch:
        crash_at(patch, online.OnlineTrainer, "train_step", 2)   # round 2's second rollout
        with pytest.raises(Crash):
            irl.train_irl(cfg(split, "train.resume=true"), log=lambda *_: None)
    assert (split / "iter-2" / "rl" / "checkpoint-1").is_dir()
    resumed = irl.train_irl(cfg(split, "train.resume=true"), log=lambda *_: None)
    a = load_file(straight["final_model"] + "/model.safetensors")
    b = load_file(resumed["final_model"] + "/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["steps"] == resumed["steps"] == 8
    assert not list((split / "iter-1" / "rl").glob("checkpoint-*"))  # a finished round's RL state is dropped
    reward_steps = [r["step"] for r in map(json.loads, (split / "metrics.jsonl").read_text().splitlines())]
    assert reward_steps == [1, 2, 5, 6]
