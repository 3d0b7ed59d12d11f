"""Shared fixtures: one small synthetic-language world with datasets and a tiny Llama, built once."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """World JSONs + pairs/demonstrations/prompts JSONL and a tiny Llama whose tokenizer knows the words."""
    from distalign.models import make_tiny
    from distalign.testbed.lm import LMWorld
    from distalign.testbed.lm_data import write_world_datasets

    root = tmp_path_factory.mktemp("world")
    world = LMWorld.create(seed=0)
    write_world_datasets(world, root / "data", n_pairs=96, n_demos=96, n_prompts=32, seed=0)
    make_tiny(root / "tiny", arch="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=300,
              corpus=world.corpus(), seed=0)
    return root


def offline_overrides(world_dir: Path, method: str, out: Path, *extra: str) -> list[str]:
    data = "demonstrations.jsonl" if method == "sft" else "pairs.jsonl"
    return [f"method={method}", f"model.name_or_path={world_dir / 'tiny'}", f"data.train={world_dir / 'data' / data}",
            f"train.output_dir={out}", "train.batch_size=4", "train.log_every=1", "train.progress_bar=false",
            "optim.learning_rate=1e-3", "optim.warmup_steps=0", *extra]


@pytest.fixture
def float64_default():
    """float64 for one test (the setting is process-wide, so restore it); modules use it with
    `pytestmark = pytest.mark.usefixtures("float64_default")`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
