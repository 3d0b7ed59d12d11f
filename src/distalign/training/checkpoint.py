"""Atomic, safetensors-only checkpoints that resume a run exactly, and the rules of a run folder.

Layout of `output_dir/checkpoint-{step}/`:
  model.safetensors           trainable weights (the full model, or only the LoRA adapter's tensors)
  optimizer.safetensors       every tensor of the optimizer and scheduler state (and of the trainer state),
                              flattened by key path
  state.json                  the non-tensor rest: param groups, scheduler counters, trainer state, Python
                              RNG, the run's identity (`run_identity`) and the byte size of the other files
  rng.safetensors             torch CPU/CUDA RNG states
A checkpoint is written into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written checkpoint that `latest_checkpoint` would pick up. `final/` (written by the
trainers) holds the model, tokenizer and config only; optimizer state lives only in step checkpoints,
of which `train.keep_checkpoints` are kept. An FSDP-sharded model's checkpoint has the same layout and
names: the full state is gathered to save and sharded back on load (`training.sharded`).

`begin_run` applies the run-folder rules every trainer shares: a fresh run refuses a folder that already
holds a run (unless `train.overwrite`, which clears it); `train.resume` needs a readable checkpoint (a
damaged newest one falls back to the one before, with a warning), refuses one whose run identity differs
(method, model, objective, data, global batch, seed, step count) unless the field is listed in
`train.resume_allow`, and cuts metrics.jsonl back to the checkpoint's step.
"""
from __future__ import annotations

import hashlib
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
TMP_PREFIX = f".tmp-{PREFIX}"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
# What a run writes into its folder: refused by a fresh run, cleared by `train.overwrite`.
RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "tensorboard", "wandb", "final", "final-merged")


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used as asked; the message is one line."""


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


def load_trainable(model: torch.nn.Module, weights: dict) -> None:
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
                    trainer_state: dict | None = None, keep: int = 2, identity: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint-{step} atomically (temp folder + rename) and prune all but the newest `keep`.

    state.json, written last, records the run's `identity`, the byte size of the other files (so a
    truncated file is recognised) and of metrics.jsonl at this moment (what a resume cuts it back to).
    `model_state` / `optimizer_state` replace the model's and optimizer's own state dicts (the full state
    of a sharded model, gathered by `save_checkpoint_on_main`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}-", dir=output_dir))
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
            "run": identity,
        }
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, plain["rng"] = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        plain["sizes"] = {name: (tmp / name).stat().st_size for name in FILES}
        metrics = output_dir / "metrics.jsonl"
        plain["metrics_bytes"] = metrics.stat().st_size if metrics.is_file() else 0
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
                            scheduler=None, trainer_state: dict | None = None, keep: int = 2,
                            identity: dict | None = None) -> Path | None:
    """`save_checkpoint` by the main process of a run while every process waits before and after (so none
    reads or prunes a checkpoint another is still writing). Returns the path on the main process.
    A sharded model's full state is gathered first, by every process."""
    accelerator.wait_for_everyone()
    gathered = gathered_state(model, optimizer)
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(output_dir, step, model, optimizer, scheduler, trainer_state, keep, identity,
                               **gathered)
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


def _step_folders(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders are never listed)."""
    return [p for p in _step_folders(Path(output_dir)) if (p / "state.json").is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_checkpoint(path: str | Path) -> dict:
    """Every file of a checkpoint read into memory and checked, before anything is applied to a model.

    Raises CheckpointError naming the damaged file (missing, truncated, not safetensors, not JSON)."""
    path = Path(path)
    state_file = path / "state.json"
    try:
        plain = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{state_file}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{state_file}: not a readable checkpoint state ({type(err).__name__})") from None
    if not isinstance(plain, dict) or not isinstance(plain.get("step"), int) or "rng" not in plain:
        raise CheckpointError(f"{state_file}: not a distalign checkpoint state (no step / rng entries)")
    files = {}
    for name in FILES:
        file = path / name
        expected = plain.get("sizes", {}).get(name)
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if expected is not None and file.stat().st_size != expected:
            raise CheckpointError(f"{file}: truncated or changed ({file.stat().st_size} bytes, "
                                  f"{expected} when written)")
        try:
            files[name] = load_file(str(file))
        except Exception as err:  # safetensors raises its own error type for every malformed file
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    return {"path": path, "plain": plain, "model": files["model.safetensors"],
            "tensors": files["optimizer.safetensors"], "rng": files["rng.safetensors"]}


def apply_checkpoint(data: dict, model: torch.nn.Module, optimizer=None, scheduler=None,
                     restore_rng: bool = True) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `read_checkpoint`'s result; return the trainer state."""
    plain, tensors = data["plain"], data["tensors"]
    optimizer_state = None
    if optimizer is not None and plain["optimizer"] is not None:
        optimizer_state = _int_keys(_join_tensors(plain["optimizer"], tensors))
    if model is not None and is_sharded(model):  # collective: every process loads the full state, keeps its shard
        load_full_state(model, optimizer, data["model"], optimizer_state)
    else:
        if model is not None:
            load_trainable(model, data["model"])
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
    if scheduler is not None and plain["scheduler"] is not None:
        scheduler.load_state_dict(_join_tensors(plain["scheduler"], tensors))
    if restore_rng:
        set_rng_state(data["rng"], plain["rng"])
    return {"step": plain["step"], **_join_tensors(plain["trainer_state"], tensors)}


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state saved with them."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scheduler, restore_rng)


# ---- what defines a run ------------------------------------------------------------------------------

def weights_fingerprint(model: torch.nn.Module, samples: int = 1024) -> str:
    """A cheap hash of a model's weights: names, shapes, dtypes and `samples` evenly strided values of every
    tensor, so another model of the same shape (or dtype) is told apart without reading all weights."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picked = flat[::max(1, flat.numel() // samples)][:samples].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")


def records_fingerprint(records: list) -> str:
    """A hash of tokenized records (every token id, and the extra columns reward functions see)."""
    from array import array
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(len(records)).encode())
    for record in records:
        for name in ID_FIELDS:
            ids = getattr(record, name, None)
            if ids is not None:
                digest.update(name.encode())
                digest.update(array("q", ids).tobytes())
        extra = getattr(record, "extra", None)
        if extra:
            digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_identity(cfg, model: torch.nn.Module, *, data: dict[str, list], global_batch: int, total_steps: int,
                 objective: dict) -> dict:
    """What defines a run, as flat dotted fields a resume compares with the checkpoint's: the method, the
    model (path and a fingerprint of its initial weights), the reference, the objective's settings
    (`objective`, e.g. {"loss": {...}}), a fingerprint of each data file's records, the global batch,
    the seed and the run's step count (`max_steps`)."""
    identity = {"method": cfg.method, "model.name_or_path": cfg.model.name_or_path,
                "model.weights": weights_fingerprint(model), "reference": getattr(cfg, "reference", None),
                **_flatten(objective), **{f"data.{name}": records_fingerprint(r) for name, r in data.items()},
                "global_batch": global_batch, "train.seed": cfg.train.seed, "max_steps": total_steps}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from state.json


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def check_identity(saved: dict | None, current: dict, allow, step: int, where: Path, log=print) -> None:
    """Refuse to resume a checkpoint whose run differs from this one, naming the differing fields."""
    unknown = [name for name in allow if name not in current]
    if unknown:
        raise CheckpointError(f"train.resume_allow: unknown field {unknown[0]!r}; fields: {', '.join(current)}")
    if current["max_steps"] < step:
        raise CheckpointError(f"{where}: the run's step count {current['max_steps']} (train.max_steps / epochs) is "
                              f"below the checkpoint's step {step}; resume with at least {step} steps")
    if saved is None:
        log(f"warning: {where} records no run identity (written by an older distalign); not compared")
        return
    differing = [k for k in dict.fromkeys([*saved, *current]) if saved.get(k) != current.get(k) and k not in allow]
    if differing:
        changes = ", ".join(f"{k} ({_short(saved.get(k))} -> {_short(current.get(k))})" for k in differing)
        raise CheckpointError(f"{where}: train.resume=true, but this run differs from the checkpoint's in {changes}; "
                              "resume with the checkpoint's settings, use a new train.output_dir, or allow the "
                              f"change with train.resume_allow=[{', '.join(differing)}]")


# ---- the run folder -----------------------------------------------------------------------------------

def run_artifacts(output_dir: Path) -> list[Path]:
    """What an earlier run left in `output_dir` (checkpoints, temp folders, logs, final models, IRL rounds)."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir()
                  if p.name in RUN_ARTIFACTS or p.name.startswith((PREFIX, TMP_PREFIX, "iter-")))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def newest_readable_checkpoint(output_dir: Path, log=print) -> dict:
    """`read_checkpoint` of the newest checkpoint that reads, warning (one line) for each damaged one skipped."""
    folders = _step_folders(output_dir)
    if not folders:
        raise CheckpointError(f"train.resume=true, but {output_dir} has no checkpoint to resume from; "
                              "run without train.resume to start afresh")
    errors = []
    for folder in reversed(folders):
        try:
            data = read_checkpoint(folder)
        except CheckpointError as err:
            errors.append(str(err))
            log(f"warning: {err}; trying the checkpoint before it")
            continue
        return data
    raise CheckpointError(f"train.resume=true, but no checkpoint in {output_dir} is readable (newest: {errors[0]})")


def truncate_metrics(output_dir: Path, size: int | None) -> None:
    """Cut metrics.jsonl back to its size when the checkpoint was written, so no step is logged twice."""
    metrics = output_dir / "metrics.jsonl"
    if size is not None and metrics.is_file() and metrics.stat().st_size > size:
        with open(metrics, "r+b") as handle:
            handle.truncate(size)


def begin_run(config, output_dir: str | Path, *, run, identity: dict, model=None, optimizer=None,
              scheduler=None, log=print, main_process: bool = True, barrier=None) -> dict:
    """Start or continue a run under the run-folder rules (module docstring); return the trainer state
    ({"step": 0} for a fresh run). `run` is the RunConfig (resume, overwrite, resume_allow); `barrier`
    (accelerator.wait_for_everyone) keeps processes from reading a folder the main one is changing."""
    import dataclasses

    import yaml
    out = Path(output_dir)
    wait = barrier or (lambda: None)
    state = {"step": 0}
    if run.resume:
        data = newest_readable_checkpoint(out, log)
        check_identity(data["plain"].get("run"), identity, run.resume_allow, data["plain"]["step"], data["path"], log)
        state = apply_checkpoint(data, model, optimizer, scheduler)
        log(f"resumed from {data['path']} at step {state['step']}")
    else:
        left = [p for p in run_artifacts(out) if not p.name.startswith(TMP_PREFIX)]
        if left and not run.overwrite:
            raise CheckpointError(f"{out} already holds a run ({', '.join(p.name for p in left[:4])}); continue it "
                                  "with train.resume=true, replace it with train.overwrite=true, or pick a new "
                                  "train.output_dir")
    wait()  # every process has read the folder before the main one changes it
    if main_process:
        for path in run_artifacts(out):
            if path.name.startswith(TMP_PREFIX) or (run.overwrite and not run.resume):
                _remove(path)
        if run.resume:
            truncate_metrics(out, data["plain"].get("metrics_bytes"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    wait()
    return state
