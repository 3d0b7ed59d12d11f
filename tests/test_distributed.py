"""Two CPU processes (gloo) give the same model as one process with the same global batch: each process
takes its contiguous half of every global batch and DDP averages gradients.

accelerate 1.x's `accelerate launch --cpu --num_processes 2` starts a single process (its CPU
multi-process path needs mpirun), so the test launches with torchrun; `accelerate launch --multi_gpu
--num_processes 2` on a machine without GPUs forms the same gloo group (distalign passes cpu=True)."""
import socket
import subprocess
import sys
from pathlib import Path

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
    a = load_file(str(tmp_path / "one" / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint-3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
