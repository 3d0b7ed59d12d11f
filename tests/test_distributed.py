"""Two CPU processes (gloo) give the same model as one process with the same global batch: each process
takes its contiguous half of every global batch and DDP averages gradients. Offline (DPO) and online
(GRPO and PPO through DDP, online distillation and online DPO through `average_gradients`: the
sampler's draws are cut from one draw per global batch, so both runs sample the same tokens; batch
statistics such as PPO's whitening are reduced over both processes).

accelerate 1.x's `accelerate launch --cpu --num_processes 2` starts a single process (its CPU
multi-process path needs mpirun), so the test launches with torchrun; `accelerate launch --multi_gpu
--num_processes 2` on a machine without GPUs forms the same gloo group (distalign passes cpu=True)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import offline_overrides
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(world_dir, tmp_path):
    common = ["train.max_steps=3", "optim.max_grad_norm=0", "train.save_every=0"]
    single = subprocess.run([sys.executable, "-m", "distalign", "train", "dpo", *offline_overrides(
        world_dir, "dpo", tmp_path / "one", "train.batch_size=8", *common)[1:]],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "-m", "distalign", "train", "dpo", *offline_overrides(
                                 world_dir, "dpo", tmp_path / "two", "train.batch_size=4", *common)[1:]],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert double.returncode == 0, double.stderr[-3000:]
    # only the main process prints its lines and "done:"
    assert double.stdout.count("done:") == 1 and double.stdout.count("read 96 rows") == 1, double.stdout
    a = load_file(str(tmp_path / "one" / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint-3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


REWARD_MODULE = """
def vowel_fraction(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in s) / max(1, len(s)) for s in completions]
"""


@pytest.mark.parametrize("method, logged, extra", [
    ("grpo", ("train/reward_mean", "train/reward_std", "train/kl", "train/response_length"), []),
    # PPO: advantage whitening and the token mean span both processes; two epochs move the ratio off 1.
    ("ppo", ("train/reward_mean", "train/kl", "train/value_loss", "train/policy_loss"), ["update_epochs=2"]),
    ("online_distill", ("train/reward_mean", "train/kl", "train/response_length", "train/preference_loss"), []),
    # online DPO: the mean over labelled pairs (reward ties dropped) spans both processes.
    ("online_dpo", ("train/reward_mean", "train/labelled_fraction", "train/preference_loss"), []),
])
def test_online_two_processes_match_one(world_dir, tmp_path, method, logged, extra):
    (tmp_path / "two_proc_rewards.py").write_text(REWARD_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    common = [f"model.name_or_path={world_dir / 'tiny'}", f"data.train={world_dir / 'data' / 'prompts.jsonl'}",
              "rewards=[{kind: callable, path: 'two_proc_rewards:vowel_fraction'}]", "train.max_steps=2",
              "generation.max_new_tokens=6", "generation.temperature=1.0", "generation.num_samples=4",
              "optim.learning_rate=1e-3", "train.progress_bar=false", "train.log_every=1"]

    def train(launcher: list[str], out: str, batch_size: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *launcher, "-m", "distalign", "train", method, *common,
                               f"train.output_dir={tmp_path / out}", f"train.batch_size={batch_size}", *extra],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)

    single = train([], "one", 4)
    assert single.returncode == 0, single.stderr[-3000:]
    double = train(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())],
                   "two", 2)
    assert double.returncode == 0, double.stderr[-3000:]
    logs = [[json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
            for out in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 2  # the second process logs nothing
    for a, b in zip(*logs):  # the same completions: the same rewards and KL
        for key in logged:
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    a = load_file(str(tmp_path / "one" / "checkpoint-2" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint-2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_accelerate_launch_that_starts_one_process_is_refused(world_dir, tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu runs one process on CPU: refused with
    how to get two, before anything is trained or written."""
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                          "-m", "distalign", "train", "dpo",
                          *offline_overrides(world_dir, "dpo", tmp_path / "run", "train.max_steps=1")[1:]],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("distalign: error:")]
    assert len(errors) == 1 and "--multi_gpu" in errors[0] and "torchrun --nproc_per_node 2" in errors[0], out.stderr
    assert not (tmp_path / "run").exists()


def test_check_launch_reads_the_launcher_command_line(monkeypatch):
    from distalign.training.common import LaunchError, check_launch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    with pytest.raises(LaunchError, match="--num_processes 3 started a single process"):
        check_launch(["accelerate", "launch", "--num-processes=3", "-m", "distalign"])
    check_launch(["accelerate", "launch", "--num_processes", "1", "-m", "distalign"])
    monkeypatch.setenv("WORLD_SIZE", "2")   # a real multi-process launch
    check_launch(["accelerate", "launch", "--num_processes", "2", "--multi_gpu"])


def test_check_launch_reads_the_process_count_from_the_accelerate_config(monkeypatch, tmp_path):
    """`accelerate launch --config_file F` with `num_processes: 2` in F (or in accelerate's default
    config) that started one process: refused, naming the file; the command-line flag wins over it."""
    from distalign.training.common import LaunchError, check_launch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    config = tmp_path / "two.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 2\n")
    with pytest.raises(LaunchError, match=f"accelerate launch with {config} \\(num_processes: 2\\) started a single"):
        check_launch(["accelerate", "launch", "--config-file", str(config), "-m", "distalign"])
    check_launch(["accelerate", "launch", "--config_file", str(config), "--num_processes", "1", "-m", "distalign"])
    monkeypatch.setattr("accelerate.commands.config.default_config_file", str(config))
    with pytest.raises(LaunchError, match="torchrun --nproc_per_node 2"):
        check_launch(["accelerate", "launch", "-m", "distalign"])
    check_launch(["accelerate", "launch", "--config_file", str(tmp_path / "missing.yaml"), "-m", "distalign"])


def fsdp_launch(out: Path, *overrides: str, world_dir: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` (2 processes; on CPU over gloo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--main_process_port", str(free_port()),
               "-m", "distalign", "train", "dpo", *offline_overrides(world_dir, "dpo", out, *overrides)[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4", "model.lora.alpha=8", "train.gradient_checkpointing=true"]],
                         ids=["full", "lora"])
def test_fsdp_matches_one_process_and_resumes(world_dir, tmp_path, extra):
    """FSDP2 over 2 processes = one process on the same global batch (weights, optimizer state and losses
    within fp32 reduction-order noise); its checkpoints have the one-process layout and names; a run stopped
    after the step-2 checkpoint and resumed ends bitwise where the uninterrupted FSDP run ends, and a
    one-process run resumes from the FSDP checkpoint."""
    common = ["train.max_steps=4", "train.save_every=2", "optim.max_grad_norm=1.0", *extra]
    single = subprocess.run([sys.executable, "-m", "distalign", "train", "dpo", *offline_overrides(
        world_dir, "dpo", tmp_path / "one", "train.batch_size=8", *common)[1:]],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = fsdp_launch(tmp_path / "fsdp", "train.batch_size=4", *common, world_dir=world_dir)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "FSDP2: parameters, gradients and optimizer state sharded over 2 processes" in sharded.stdout
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    for name in ("checkpoint-4/model.safetensors", "checkpoint-4/optimizer.safetensors", f"final/{weights}"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "fsdp" / name))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    logs = [[json.loads(line)["train/loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "fsdp")]
    assert len(logs[1]) == 4 and max(abs(x - y) for x, y in zip(*logs)) < 1e-6, logs

    stopped = tmp_path / "stopped"  # what a run killed after writing checkpoint-2 leaves behind
    stopped.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", stopped / "checkpoint-2")
    shutil.copy(tmp_path / "fsdp" / "config.yaml", stopped / "config.yaml")
    resumed = fsdp_launch(stopped, "train.batch_size=4", "train.resume=true", *common, world_dir=world_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for name in ("checkpoint-4/model.safetensors", "checkpoint-4/optimizer.safetensors", f"final/{weights}"):
        a, b = load_file(str(tmp_path / "fsdp" / name)), load_file(str(stopped / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    crossed = tmp_path / "crossed"  # one process resumes the FSDP run's checkpoint: the same format
    crossed.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", crossed / "checkpoint-2")
    shutil.copy(tmp_path / "fsdp" / "config.yaml", crossed / "config.yaml")
    one = subprocess.run([sys.executable, "-m", "distalign", "train", "dpo", *offline_overrides(
        world_dir, "dpo", crossed, "train.batch_size=8", "train.resume=true", *common)[1:]],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert one.returncode == 0 and "resumed from" in one.stdout, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / f"final/{weights}")), load_file(str(crossed / f"final/{weights}"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp_and_deepspeed_are_refused_where_unsupported(monkeypatch):
    from distalign.training.common import LaunchError, make_accelerator
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError, match="grpo: FSDP is supported by the offline trainer only"):
        make_accelerator("no", what="grpo")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate would ignore it on CPU, silently
    with pytest.raises(LaunchError, match="dpo: DeepSpeed launches are not supported; shard with FSDP2"):
        make_accelerator("no", fsdp=True, what="dpo")
