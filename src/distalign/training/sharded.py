"""Checkpoints of an FSDP-sharded model (accelerate's FSDP, version 2: `fully_shard`), in the same format
as a one-process run's, so either kind of run resumes from the other's checkpoints.

Under FSDP2 each process holds one shard of every parameter (a DTensor) and of its optimizer state. Saving
gathers the full tensors on the main process (a collective: every process calls it), under the names a
one-process run saves: trainable weights as `checkpoint.trainable_state_dict` gives them (a PEFT model's
adapter only, tied aliases once) and the optimizer state keyed by parameter position, as
`optimizer.state_dict()` keys it. Loading reads that full state on every process and keeps each process's
shard (`torch.distributed.checkpoint.state_dict.set_*_state_dict`).
"""
from __future__ import annotations

import torch


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any submodule of `model` is FSDP2-sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another, earlier-named parameter (e.g. an LM head tied to the embedding)."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The model's own state dict, full tensors on the main process's CPU (empty on the others);
    a PEFT model's trainable tensors only, tied aliases once. What `save_pretrained(state_dict=...)` takes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=_is_peft(model)))
    aliases = tied_aliases(model)
    return {k: v for k, v in state.items() if k not in aliases}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The trainable weights in `trainable_state_dict`'s format, full, on the main process's CPU
    (empty on the others)."""
    state = gather_model_state(model)
    if _is_peft(model) and state:
        from peft import get_peft_model_state_dict
        state = get_peft_model_state_dict(model, state_dict=state)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _parameter_names(model: torch.nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters' names, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in _torch_optimizer(optimizer).param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """Collective. The optimizer state, full, keyed like `optimizer.state_dict()` (parameter positions), on
    the main process's CPU (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_options(cpu_offload=True))
    if not state:
        return {}
    position = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    groups = [{**group, "params": [position[n] for n in group["params"]]} for group in state["param_groups"]]
    return {"state": {position[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def _model_names(model: torch.nn.Module, saved: dict) -> dict:
    """Saved keys -> the model's own state-dict keys (they differ only for PEFT, which drops the adapter
    name): PEFT's renaming applied to the model's own state dict, whose values are the model's tensors."""
    if not _is_peft(model):
        return {k: k for k in saved}
    from peft import get_peft_model_state_dict
    own = model.state_dict()
    key_of = {id(v): k for k, v in own.items()}
    return {k: key_of[id(v)] for k, v in get_peft_model_state_dict(model, state_dict=own).items()}


def load_full_state(model: torch.nn.Module, optimizer, weights: dict, optimizer_state: dict | None) -> None:
    """Collective. Put full saved weights (and optimizer state) into the sharded model (and optimizer):
    every process passes the same full tensors and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    names = _model_names(model, weights)
    unknown = sorted(set(weights) - set(names))
    result = set_model_state_dict(model, {names[k]: v for k, v in weights.items() if k in names},
                                  options=_options(strict=False))
    expected = set(names.values()) if _is_peft(model) else set(model.state_dict()) - tied_aliases(model)
    missing = sorted(expected & set(result.missing_keys))
    if unknown or missing or result.unexpected_keys:
        raise ValueError(f"checkpoint weights do not match the model: missing {missing[:3]}, "
                         f"unexpected {(unknown + list(result.unexpected_keys))[:3]}")
    if optimizer is not None and optimizer_state is not None:
        order = _parameter_names(model, optimizer)
        by_name = {"state": {order[int(i)]: v for i, v in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, _torch_optimizer(optimizer), by_name, options=_options())
