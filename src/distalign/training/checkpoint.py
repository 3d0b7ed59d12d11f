"""Atomic, safetensors-only checkpoints that resume a run exactly.

Layout of `output_dir/checkpoint-{step}/`:
  model.safetensors           trainable weights (the full model, or only the LoRA adapter's tensors)
  optimizer.safetensors       every tensor of the optimizer and scheduler state, flattened by key path
  state.json                  the non-tensor rest: param groups, scheduler counters, trainer state, Python RNG
  rng.safetensors             torch CPU/CUDA RNG states
A checkpoint is written into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written checkpoint that `latest_checkpoint` would pick up. An FSDP-sharded model's
checkpoint has the same layout and names: the full state is gathered to save and sharded back on load
(`training.sharded`).
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .sharded import full_model_state, full_optimizer_state, is_sharded, load_full_state

PREFIX = "checkpoint-"


def _split_tensors(tree: Any, path: str, tensors: dict) -> Any:
    """Replace every tensor in a nested dict/list by a reference key, collecting tensors by key path."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(tree, dict):
        return {str(k): _split_tensors(v, f"{path}.{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _join_tensors(tree: Any, tensors: dict) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors) for v in tree]
    return tree


def _int_keys(state: dict) -> dict:
    """JSON turned the optimizer's integer parameter ids into strings; turn them back."""
    state = dict(state)
    state["state"] = {int(k): v for k, v in state.get("state", {}).items()}
    return state


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights that training changes: all parameters, or only the adapter's for a PEFT model.

    Tied tensors (e.g. embeddings shared with the LM head) are stored once, under their first name;
    safetensors refuses aliases, and loading restores the tie through the shared storage.
    """
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict
        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    unique, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().cpu().contiguous()
    return unique


def _load_trainable(model: torch.nn.Module, weights: dict) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in weights if k in state}
    untied_missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if unexpected or untied_missing:
        raise ValueError(f"checkpoint weights do not match the model: missing {untied_missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py_state = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py_state[0], list(py_state[1]), py_state[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    trainer_state: dict | None = None, keep: int = 2, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint-{step} atomically (temp folder + rename) and prune all but the newest `keep`.

    `model_state` / `optimizer_state` replace the model's and optimizer's own state dicts (the full state
    of a sharded model, gathered by `save_checkpoint_on_main`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=output_dir))
    try:
        save_file(model_state if model_state is not None else trainable_state_dict(model),
                  str(tmp / "model.safetensors"))
        opt_tensors: dict = {}
        if optimizer is not None and optimizer_state is None:
            optimizer_state = optimizer.state_dict()
        plain = {
            "optimizer": _split_tensors(optimizer_state, "optimizer", opt_tensors) if optimizer else None,
            "scheduler": _split_tensors(scheduler.state_dict(), "scheduler", opt_tensors) if scheduler else None,
            "trainer_state": _split_tensors(trainer_state or {}, "trainer", opt_tensors),
            "step": step,
        }
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, plain["rng"] = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(plain))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint_on_main(accelerator, output_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None,
                            scheduler=None, trainer_state: dict | None = None, keep: int = 2) -> Path | None:
    """`save_checkpoint` by the main process of a run while every process waits before and after (so none
    reads or prunes a checkpoint another is still writing). Returns the path on the main process.
    A sharded model's full state is gathered first, by every process."""
    accelerator.wait_for_everyone()
    gathered = gathered_state(model, optimizer)
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(output_dir, step, model, optimizer, scheduler, trainer_state, keep, **gathered)
    accelerator.wait_for_everyone()
    return path


def gathered_state(model: torch.nn.Module, optimizer=None) -> dict:
    """Collective. For an FSDP-sharded model, its full `model_state` (and `optimizer_state`) for
    `save_checkpoint` (on the main process; empty on the others); nothing for an unsharded model."""
    if not is_sharded(model):
        return {}
    state = {"model_state": full_model_state(model)}
    if optimizer is not None:
        state["optimizer_state"] = full_optimizer_state(model, optimizer)
    return state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders are never listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state saved with them."""
    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    plain = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer_state = None
    if optimizer is not None and plain["optimizer"] is not None:
        optimizer_state = _int_keys(_join_tensors(plain["optimizer"], tensors))
    if is_sharded(model):  # collective: every process loads the full state and keeps its shard
        load_full_state(model, optimizer, weights, optimizer_state)
    else:
        _load_trainable(model, weights)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
    if scheduler is not None and plain["scheduler"] is not None:
        scheduler.load_state_dict(_join_tensors(plain["scheduler"], tensors))
    if restore_rng:
        set_rng_state(load_file(str(path / "rng.safetensors")), plain["rng"])
    return _join_tensors(plain["trainer_state"], tensors)


def begin_run(config, output_dir: str | Path, *, resume: bool = False, model=None, optimizer=None,
              scheduler=None, log=print, main_process: bool = True) -> int:
    """Start or continue a run: restore the newest checkpoint when `resume` (returning its step),
    and save the resolved config as output_dir/config.yaml so every run records what it ran."""
    import dataclasses

    import yaml
    out = Path(output_dir)
    start = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        start = int(load_checkpoint(ckpt, model, optimizer, scheduler)["step"])
        log(f"resumed from {ckpt} at step {start}")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return start
