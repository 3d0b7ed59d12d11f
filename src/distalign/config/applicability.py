"""Refusing the config fields a method would ignore.

Every field a method accepts must change what it does, or be refused for that method with a one-line
error (the project's rule; `tests/test_config_fields.py` walks every field of every method to hold it).
A schema lists, per dotted field, a rule `rule(config) -> reason | None`: the reason the field has no
effect in this config, or None where it has one. `refuse_ignored` raises for every field that is set to
anything but its default while its rule gives a reason:

    config.yaml: field 'loss.entropy_coef': has no effect for method grpo: only reverse_kl reads it; remove it
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Rule = Callable[[Any], "str | None"]


def value_at(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def refuse_ignored(config: Any, rules: dict[str, Rule]) -> None:
    """ValueError(field, problem) for the first field set away from its default that its rule says is
    ignored. Defaults are those of the schema itself (`type(config)()`)."""
    defaults = type(config)()
    for dotted, rule in rules.items():
        if value_at(config, dotted) == value_at(defaults, dotted):
            continue
        reason = rule(config)
        if reason:
            method = getattr(config, "method", "")
            raise ValueError(dotted, f"has no effect for method {method}: {reason}; remove it")


def only(*methods: str, attribute: str = "method") -> Rule:
    """The field is read by `methods` only (the config's `attribute`, default its method)."""
    def rule(config):
        if value_at(config, attribute) in methods:
            return None
        return f"only {', '.join(methods)} read{'s' if len(methods) == 1 else ''} it"
    return rule


def never(reason: str) -> Rule:
    return lambda config: reason


def when(condition: Callable[[Any], bool], reason: str) -> Rule:
    """The field is ignored where `condition(config)` holds."""
    return lambda config: reason if condition(config) else None


def first_reason(*rules: Rule) -> Rule:
    def rule(config):
        for r in rules:
            if (reason := r(config)):
                return reason
        return None
    return rule


def split_rule(*source_fields: str) -> Rule:
    """`data.split` names a split of a dataset folder or Hub id; a file is a single split, so the field
    is ignored when every data source of the run is an existing file."""
    def rule(config):
        sources = [value_at(config, f) for f in source_fields]
        given = [s for s in sources if s]
        if given and all(Path(s).is_file() for s in given):
            return "every data source is a file (a single split); it applies to dataset folders and Hub ids"
        return None
    return rule


def with_prefix(rules: dict[str, Rule], prefix: str, view: Callable[[Any], Any]) -> dict[str, Rule]:
    """The same rules for a sub-config at `prefix`, each evaluated on `view(config)`."""
    return {f"{prefix}{name}": (lambda config, rule=rule: rule(view(config))) for name, rule in rules.items()}


def fields(names: Iterable[str], rule: Rule) -> dict[str, Rule]:
    return {name: rule for name in names}
