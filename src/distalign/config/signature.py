"""Config schemas read off an objective's signature: its hyperparameters (keyword arguments with
defaults), typed by its annotations, with the ranges or choices its registry entry declares.

    signature_schema(dpo_loss, {"beta": "(0, inf)"})    # a dataclass with `beta: float = 0.1`
    offline_loss_schema({"method": "dpo"})              # the same, picked by the config's method

So `loss.beta=5e-2` reaches the objective as a float, `loss.beta=abc` and `loss.beta=-1` fail at load
naming `loss.beta`, and `--list-fields` shows each hyperparameter with its default and range.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

from .schema import _f

CONFIG_TYPES = (int, float, str, bool, type(None))


def _config_type(annotation: Any) -> Any:
    """The annotation without members a config file cannot hold (`Tensor | float` -> float)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a in CONFIG_TYPES]
        if not members:
            return Any
        return members[0] if len(members) == 1 else Union[tuple(members)]
    return annotation if annotation in CONFIG_TYPES else Any


@functools.lru_cache(maxsize=None)
def _schema(fn: Callable, valid_items: tuple) -> type:
    valid = dict(valid_items)
    hints = typing.get_type_hints(fn)
    fields = []
    for name, parameter in inspect.signature(fn).parameters.items():
        if parameter.default is inspect.Parameter.empty:
            continue
        rule = valid.get(name)
        spec = _f(parameter.default, f"{fn.__name__} hyperparameter",
                  choices=rule if isinstance(rule, tuple) else None,
                  range=rule if isinstance(rule, str) else None)
        fields.append((name, _config_type(hints.get(name, Any)), spec))
    return dataclasses.make_dataclass(f"{fn.__name__}_hyperparameters", fields)


def signature_schema(fn: Callable, valid: Mapping[str, str | tuple] | None = None) -> type:
    """A dataclass of `fn`'s hyperparameters; `valid` maps a name to a range string or a choices tuple."""
    return _schema(fn, tuple(sorted((valid or {}).items())))


def offline_loss_schema(values: Mapping) -> type | None:
    """The `loss:` schema of an offline config's method (None while the method is unknown, so the
    method's own check speaks)."""
    from distalign.objectives.registry import offline_objective  # torch: only when a config loads
    method = values.get("method")
    entry = offline_objective(method) if isinstance(method, str) else None
    return signature_schema(*entry) if entry is not None else None
