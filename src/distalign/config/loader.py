"""Typed configs from YAML files plus `key=value` overrides, validated against dataclass schemas.

Every error is one line naming where the value came from (the YAML file, or "command line" for a
`key=value` override) and the dotted field, e.g.
`configs/dpo.yaml: field 'optim.learning_rate': expected float, got str 'fast'`,
`command line: field 'train.max_steps': must be >= 0, got -5` or
`configs/dpo.yaml: unknown key 'optim.lr'; valid keys: learning_rate, weight_decay, ...`.

Schema metadata (`schema._f`): `help`, `choices`, `range` (interval notation, `config.ranges`) and
`schema` (for a mapping field whose keys depend on its siblings, such as `loss` on `method`: a
function of the parent's raw values giving the dataclass to check it against, or None).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml

from .ranges import Range

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config problem; the message names the file (or the command line) and the field."""


def _parent(path: str) -> str:
    """'a.b[2].c' -> 'a.b[2]' -> 'a.b' -> 'a' -> ''."""
    return re.sub(r"(\.?[^.\[]+|\[\d+\])$", "", path)


@dataclasses.dataclass(frozen=True)
class Location:
    """A value's dotted path in the config tree and where each value came from.

    `origins` maps dotted keys set by overrides to COMMAND_LINE; a value inherits the origin of its
    nearest ancestor key there, else it came from `source` (the YAML file).
    """

    source: str
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict)
    path: str = ""

    def child(self, name: str | int) -> Location:
        if isinstance(name, int):
            return dataclasses.replace(self, path=f"{self.path}[{name}]")
        return dataclasses.replace(self, path=f"{self.path}.{name}" if self.path else name)

    @property
    def origin(self) -> str:
        key = self.path
        while key:
            if key in self.origins:
                return self.origins[key]
            key = _parent(key)
        return self.source

    def __str__(self) -> str:
        return f"{self.origin}: field '{self.path}'" if self.path else self.origin


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


_YAML_SPECIAL_FLOATS = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}


def parse_float(text: str) -> float | None:
    """A float from any spelling YAML users write (1e-5, 1E5, .5, +1.0, 1_000.0, .inf); None if not one.

    YAML 1.1 reads some of them (`1e-5`: no dot) as strings, so schemas convert strings themselves.
    """
    cleaned = text.strip().lower()
    cleaned = _YAML_SPECIAL_FLOATS.get(cleaned, cleaned)
    try:
        return float(cleaned)
    except ValueError:
        return None


def _scalar(value: Any, tp: type, where: Location) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and parse_float(value) is not None:
        return parse_float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _convert(value: Any, tp: Any, where: Location) -> Any:
    """Check and coerce `value` to the annotated type `tp` (dataclass, Optional, list, dict, scalars)."""
    if tp is Any:
        return value
    if _is_optional(tp):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0] if len(inner) == 1 else Union[tuple(inner)], where)
    if typing.get_origin(tp) in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, where)
    if typing.get_origin(tp) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_convert(v, item, where.child(i)) for i, v in enumerate(value)]
        return tuple(items) if typing.get_origin(tp) is tuple else items
    if typing.get_origin(tp) is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    return _scalar(value, tp, where)


def _check_metadata(value: Any, f: dataclasses.Field, where: Location) -> None:
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}")
    valid = f.metadata.get("range")
    problem = valid.problem(value) if valid is not None else None
    if problem:
        raise ConfigError(f"{where}: {problem}")


def _sub_schema(f: dataclasses.Field, values: Mapping) -> type | None:
    """The dataclass a mapping field's `schema` hook picks from its siblings' raw values, or None."""
    hook = f.metadata.get("schema")
    return hook(values) if hook is not None else None


def _factory_values(f: dataclasses.Field) -> dict:
    """The values a nested section's `default_factory` sets (e.g. OnlinePairwiseConfig's
    `GenerationConfig(num_samples=2)`), as a mapping the section's keys from the file then update."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    made = f.default_factory()
    if not dataclasses.is_dataclass(made):
        return {}
    plain = type(made)()
    return {k.name: getattr(made, k.name) for k in dataclasses.fields(made)
            if k.init and getattr(made, k.name) != getattr(plain, k.name)}


def build_dataclass(cls: type, values: dict, where: str | Location) -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and missing required fields are errors,
    and every value is checked against its field's `choices` and `range`.

    A schema may define `validate()` for checks across fields; it raises ValueError(field, problem)
    so the message names the field (and where that field's value came from).
    """
    where = where if isinstance(where, Location) else Location(where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = where.child(unknown[0])
        raise ConfigError(f"{key.origin}: unknown key '{key.path}'; valid keys: {', '.join(fields) or '(none)'}")
    kwargs = {}
    for name, f in fields.items():
        field_where = where.child(name)
        sub_schema, factory = _sub_schema(f, values), _factory_values(f)
        if sub_schema is not None:  # kept as a plain mapping, with the sub-schema's defaults filled in
            kwargs[name] = dataclasses.asdict(_convert(values.get(name, {}), sub_schema, field_where))
        elif name in values:
            given = {**factory, **values[name]} if factory and isinstance(values[name], dict) else values[name]
            if given is False and hints[name] is str and "no" in f.metadata.get("choices", ()):
                given = "no"  # YAML 1.1 reads accelerate's `no` (and off / false) as the boolean False
            kwargs[name] = _convert(given, hints[name], field_where)
            _check_metadata(kwargs[name], f, field_where)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], factory, field_where)  # so its own checks run
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{field_where}: required but missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            # Schemas raise ValueError(field, problem) so the message can carry the full dotted path.
            if len(err.args) == 2:
                raise ConfigError(f"{where.child(err.args[0])}: {err.args[1]}") from None
            raise ConfigError(f"{where}: {err}") from None
    return obj


def apply_override(tree: dict, assignment: str) -> str:
    """Apply `a.b.c=value` to a nested dict and return the dotted key; the value is parsed as YAML
    (so 1e-5, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"{COMMAND_LINE}: override {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{COMMAND_LINE}: override {assignment!r}: empty key part")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{COMMAND_LINE}: override {assignment!r}: '{part}' is not a mapping")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{COMMAND_LINE}: override {assignment!r}: value is not valid YAML "
                          f"({err.__class__.__name__})") from None
    return key


def apply_overrides(tree: dict, overrides, origins: dict) -> None:
    """Apply each override and record its key (replacing what it covers) as coming from the command line."""
    for assignment in overrides:
        key = apply_override(tree, assignment)
        for stale in [k for k in origins if k.startswith((key + ".", key + "["))]:
            del origins[stale]
        origins[key] = COMMAND_LINE


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
    """YAML file (optional) <- overrides, validated into dataclass `cls`; errors name the origin."""
    tree = dict(defaults or {})
    if path is not None:
        tree.update(read_yaml(path))
    origins: dict[str, str] = {}
    apply_overrides(tree, overrides, origins)
    return build_dataclass(cls, tree, Location(str(path) if path is not None else COMMAND_LINE, origins))


def to_dict(config: Any) -> dict:
    """The config as plain data (for saving next to checkpoints and logging)."""
    return dataclasses.asdict(config)


@dataclasses.dataclass(frozen=True)
class FieldHelp:
    """One row of `--list-fields`."""
    name: str
    help: str
    default: Any
    range: Range | None = None
    choices: tuple | None = None
    annotation: Any = None

    @property
    def numeric(self) -> bool:
        """Whether the field holds an int or a float (bools aside), optional or not."""
        members = typing.get_args(self.annotation) if _is_optional(self.annotation) else (self.annotation,)
        return any(m in (int, float) for m in members)

    def line(self) -> str:
        extra = f" [range: {self.range}]" if self.range is not None else ""
        extra += f" [choices: {', '.join(map(str, self.choices))}]" if self.choices else ""
        return f"{self.name:38s} {self.help} [default: {self.default}]{extra}"


def field_help(cls: type, prefix: str = "", values: Mapping | None = None) -> list[FieldHelp]:
    """Every field with help, default, range and choices, recursing into nested dataclasses and into
    the sub-schema a field's `schema` hook picks from `values` (e.g. {"method": "dpo"} for `loss.*`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_optional(tp) else [tp]
        nested = _sub_schema(f, values or {}) or (inner[0] if dataclasses.is_dataclass(inner[0]) else None)
        if nested is None or _is_optional(tp):  # an optional section also gets its own row (default None)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            rows.append(FieldHelp(prefix + f.name, f.metadata.get("help", ""), default,
                                  f.metadata.get("range"), f.metadata.get("choices"), tp))
        if nested is not None:
            rows.extend(field_help(nested, f"{prefix}{f.name}."))
    return rows
