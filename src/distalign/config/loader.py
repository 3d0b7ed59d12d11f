"""Typed configs from YAML files plus `key=value` overrides, validated against dataclass schemas.

Every error is one line naming the file and the dotted field, e.g.
`configs/dpo.yaml: field 'optim.learning_rate': expected float, got str 'fast'` or
`configs/dpo.yaml: unknown key 'optim.lr'; valid keys: learning_rate, weight_decay, ...`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the file and the field."""


def _origin(tp) -> Any:
    return typing.get_origin(tp)


def _is_optional(tp) -> bool:
    return _origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and coerce `value` to the annotated type `tp` (dataclass, Optional, list, dict, scalars)."""
    if tp is Any:
        return value
    if _is_optional(tp):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0] if len(inner) == 1 else Union[tuple(inner)], where)
    if _origin(tp) in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, where)
    if _origin(tp) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if _origin(tp) is tuple else items
    if _origin(tp) is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept any spelling Python reads as a float.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def build_dataclass(cls: type, values: dict, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and missing required fields are errors.

    A schema may define `validate()`; it raises ValueError(field, problem) for a field-level error.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = where.rsplit(": field ", 1)
    base, path = (prefix[0], prefix[1].strip("'") + ".") if len(prefix) == 2 else (where, "")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{base}: unknown key '{path}{unknown[0]}'; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        field_where = f"{base}: field '{path}{name}'"
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], field_where)
            choices = f.metadata.get("choices")
            if choices and kwargs[name] not in choices:
                raise ConfigError(f"{field_where}: must be one of {list(choices)}, got {kwargs[name]!r}")
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], {}, field_where)  # so its own checks run
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{field_where}: required but missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            # Schemas raise ValueError(field, problem) so the message can carry the full dotted path.
            if len(err.args) == 2:
                raise ConfigError(f"{base}: field '{path}{err.args[0]}': {err.args[1]}") from None
            raise ConfigError(f"{base}: {err}") from None
    return obj


def apply_override(tree: dict, assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: '{part}' is not a mapping")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML ({err.__class__.__name__})") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = (),
                defaults: dict | None = None) -> Any:
    """YAML file (optional) <- overrides, validated into dataclass `cls`."""
    tree = dict(defaults or {})
    if path is not None:
        tree.update(read_yaml(path))
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_dataclass(cls, tree, str(path) if path is not None else "<overrides>")


def to_dict(config: Any) -> dict:
    """The config as plain data (for saving next to checkpoints and logging)."""
    return dataclasses.asdict(config)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help text, default) for every field, recursing into nested dataclasses."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rows.append((prefix + f.name, f.metadata.get("help", ""), default))
    return rows
