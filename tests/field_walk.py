"""Machinery of the field walk (`test_config_fields.py`): a check, one short run of a method recorded as
everything a field could change, the enumeration of a schema's fields, and the probe of one check.

A `Record` is what one run shows from outside: its error (one line) or None, a digest of every model
file it wrote (and of results.json), its logged metrics (timing removed), the names of its files, the
progress bars it drew, every model forward (class and logits shape; decoder layers too, which
activation checkpointing runs again in the backward), the `trust_remote_code`
each load passed to the loader, and how often it kept freed memory (glibc `mallopt`). Two runs of one
config give equal records (the walk checks it), so a field changed something iff the records differ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from distalign.config import load_config

TIMING = ("_per_s", "generation_share", "generation_time", "elapsed")
MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "value_head.safetensors")
BAR = re.compile(r"(?:^|[\r\n])([A-Za-z_]+):\s+\d+%\|")
ALL = frozenset({"*"})  # Check.refused: every method of the family

REWARDS_MODULE = '''
def length_reward(prompts, completions, scale=1.0, **_):
    """Rarely equal for two different texts, so pairs are almost never ties."""
    return [scale * (len(c.split()) + sum((i + 1) * ord(ch) for i, ch in enumerate(c)) % 97 / 97) for c in completions]

def other_reward(prompts, completions, **_):
    return [float(len(c) % 3) for c in completions]

def judge(prompts, a, b):
    return [0.9 if len(x) % 2 else 0.2 for x in a]
'''


@dataclass
class Check:
    """`field=value` on top of `context` (overrides both runs share; a callable of (env, method)), plus
    `extra` overrides of the changed run only. `refused`: the methods that must refuse it (ALL: every
    one); `methods`: the methods the check applies to (default every one); `observe="output_dir"`: the
    run must write under the given folder instead of comparing records; `prepare`: run first with
    `train.max_steps=1` in the same folder and with `context` only (a resume, a reused folder); `unlocks`:
    the run without the field fails (a bad row, a reused folder, a non-finite step) and the field makes
    it go through."""
    value: str | Callable
    refused: frozenset | set | tuple = ()
    context: tuple | Callable = ()
    extra: tuple = ()
    methods: tuple | None = None
    skip: frozenset = frozenset()
    observe: str | None = None
    prepare: bool = False
    unlocks: bool = False

    def uniform(self) -> bool:
        """The same expectation for every method (no method-specific refusal, value or restriction)."""
        return (self.refused in (frozenset(), ALL) and self.methods is None and not self.skip
                and not callable(self.value))

    def applies(self, method: str) -> bool:
        return (self.methods is None or method in self.methods) and method not in self.skip

    def is_refused(self, method: str) -> bool:
        return self.refused is ALL or method in self.refused


@dataclass(frozen=True)
class Record:
    error: str | None
    weights: str
    metrics: tuple
    files: tuple
    bars: tuple
    forwards: tuple
    loads: tuple
    retained: int

    def differences(self, other: Record) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


class Spies:
    """Observers installed for a test: model forwards, loader arguments, freed-memory retention."""

    def __init__(self, monkeypatch):
        import distalign.models.loading as loading
        import distalign.training.common as common
        self.forwards, self.loads, self.retained = [], [], 0
        locate, retain = loading.locate, common.retain_freed_memory
        enable_checkpointing = loading.enable_gradient_checkpointing

        def spy_locate(name, trust_remote_code=False):
            self.loads.append(bool(trust_remote_code))
            return locate(name, trust_remote_code)

        def spy_retain(*args, **kwargs):
            self.retained += 1
            return retain(*args, **kwargs)

        def spy_checkpointing(model):
            # Recomputation in the backward runs the layers' forwards without module hooks, so the
            # switch is observed where the loader turns it on.
            self.loads.append("gradient_checkpointing")
            return enable_checkpointing(model)

        monkeypatch.setattr(loading, "locate", spy_locate)
        monkeypatch.setattr(loading, "enable_gradient_checkpointing", spy_checkpointing)
        monkeypatch.setattr(common, "retain_freed_memory", spy_retain)
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._forward)

    def _forward(self, module, args, output):
        name = type(module).__name__
        if name.endswith(("ForCausalLM", "ForSequenceClassification")):
            logits = getattr(output, "logits", None)
            self.forwards.append((name, tuple(logits.shape) if logits is not None else None))

    def reset(self):
        self.forwards, self.loads, self.retained = [], [], 0

    def close(self):
        self.handle.remove()


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(out.rglob("*")):
        if path.name in MODEL_FILES:
            for key, tensor in sorted(load_file(str(path)).items()):
                h.update(f"{path.relative_to(out)}:{key}".encode())
                h.update(tensor.float().numpy().tobytes())
        elif path.name == "results.json":
            h.update(path.read_bytes())
    return h.hexdigest()


def metrics(out: Path) -> tuple:
    rows = []
    for path in sorted(out.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            values = {k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
            rows.append((str(path.relative_to(out)), tuple(sorted(values.items()))))
    return tuple(rows)


def file_names(out: Path) -> tuple:
    names = {str(p.parent.relative_to(out)) + "/events" if p.name.startswith("events.out") else
             str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    return tuple(sorted(names))


def record(run, spies: Spies, out: Path, cache: Path, monkeypatch) -> Record:
    """Run `run()` (one short training) into `out` and record what it did; a fresh reference cache."""
    for path in (out, cache):
        shutil.rmtree(path, ignore_errors=True)
    monkeypatch.setenv("DISTALIGN_CACHE", str(cache))
    spies.reset()
    console, error = io.StringIO(), None
    with contextlib.redirect_stderr(console), contextlib.redirect_stdout(console):
        try:
            run()
        except Exception as err:  # noqa: BLE001 -- a crash is an outcome the walk reports, with its type
            error = f"{type(err).__name__}: {str(err).strip()}"
    exists = out.exists()
    return Record(error, digest(out) if exists else "", metrics(out) if exists else (),
                  file_names(out) if exists else (), tuple(sorted(set(BAR.findall(console.getvalue())))),
                  tuple(spies.forwards), tuple(spies.loads), spies.retained)


# -- the fields of a schema ---------------------------------------------------------------------------

def _optional_inner(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return None


def schema_fields(cls, prefix: str = "") -> list[str]:
    """Every dotted field of a config schema: nested sections' leaves, an optional section itself and its
    leaves (`model.lora`, `model.lora.r`), a list of sections and its items' leaves (`rewards`,
    `rewards[].kind`). Dict-valued fields (`loss` of OfflineConfig) are listed as themselves."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            names += schema_fields(tp, name + ".")
            continue
        inner = _optional_inner(tp)
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        names.append(name)
        if inner is not None and dataclasses.is_dataclass(inner):
            names += schema_fields(inner, name + ".")
        elif item is not None and dataclasses.is_dataclass(item):
            names += schema_fields(item, name + "[].")
    return names


def names_the_field(message: str, field: str) -> bool:
    """A refusal names its field: the top-level section and the leaf (or the leaf's section)."""
    parts = field.replace("[]", "").split(".")
    return parts[0] in message and (parts[-1] in message or (len(parts) > 1 and parts[-2] in message))


# -- the walk ---------------------------------------------------------------------------------------------

def resolve(x, e, m):
    return x(e, m) if callable(x) else x


class Walk:
    """Runs of one family's methods, each in a fresh folder; baselines cached per (method, context)."""

    def __init__(self, family, e, spies: Spies, monkeypatch, tmp: Path):
        self.family, self.e, self.spies, self.monkeypatch, self.tmp = family, e, spies, monkeypatch, tmp
        self.baselines, self.count = {}, 0

    def run(self, method: str, overrides: list, prepare: tuple | None = None, out: Path | None = None):
        """One run of `method` with `overrides`; `prepare` (overrides of its own) first runs one step
        into the same folder."""
        self.count += 1
        out = out or self.tmp / f"{method}-{self.count}"
        family, e = self.family, self.e

        def train():
            if prepare is not None:
                first = load_config(family.schema, None, [*family.base(e, method, out), *prepare,
                                                          "train.max_steps=1", "train.resume=false"])
                family.train(first, method)
            family.train(load_config(family.schema, None, [*family.base(e, method, out), *overrides]), method)
        return record(train, self.spies, out, self.tmp / f"cache-{self.count}", self.monkeypatch)

    def baseline(self, method: str, context: tuple, prepare: bool = False):
        """The run without the field (cached). Each method's plain run is made twice and must repeat
        exactly, or "differs" would mean nothing."""
        key = (method, context, prepare)
        if key not in self.baselines:
            first = self.run(method, list(context), context if prepare else None)
            if not context and not prepare:
                second = self.run(method, [])
                assert first == second, f"{method} is not deterministic: {first.differences(second)} differ"
            self.baselines[key] = first
        return self.baselines[key]


def coverage_failures(family, checks: dict) -> list[str]:
    """Fields without a check (the walk must learn how each new field shows) and checks of no field."""
    fields = schema_fields(family.schema)
    failures = [f"{family.schema.__name__}: add a check for field {f}" for f in fields if f not in checks]
    failures += [f"{family.schema.__name__}: a check for {f}, which is not a field" for f in checks if f not in fields]
    return failures


def assignment(field: str, value: str) -> str:
    return f"{field.split('[]')[0]}={value}"


def probe(walk: Walk, method: str, field: str, check: Check) -> str | None:
    """None when the check holds for `method`, else what went wrong."""
    e, family = walk.e, walk.family
    context, value = tuple(resolve(check.context, e, method)), resolve(check.value, e, method)
    where = f"{family.schema.__name__} {method}: {field}={value}" + (f" (context {list(context)})" if context else "")
    if check.observe == "output_dir":
        elsewhere = walk.tmp / f"elsewhere-{method}"
        rec = walk.run(method, [f"{family.output_key}={elsewhere}"])
        written = elsewhere.is_dir() and any(p.is_file() for p in elsewhere.rglob("*"))
        return None if rec.error is None and written else f"{where}: wrote nothing there ({rec.error})"
    refused = check.is_refused(method)
    prepare = check.prepare and not refused
    base = walk.baseline(method, context, prepare)
    if check.unlocks and (base.error is None or "\n" in base.error):
        return f"{where}: the run without the field should fail in one line, got {base.error!r}"
    if base.error is not None and not check.unlocks:
        return f"{where}: the run without the field fails: {base.error}"
    rec = walk.run(method, [*context, assignment(field, value), *check.extra], context if prepare else None)
    if refused:
        if rec.error is None:
            return f"{where}: expected a one-line refusal, but the run went through"
        if "\n" in rec.error or not names_the_field(rec.error, field):
            return f"{where}: the refusal must be one line naming the field, got {rec.error!r}"
        return None
    if rec.error is not None:
        return f"{where}: failed: {rec.error}"
    if rec == base:
        return f"{where}: changed nothing (weights, metrics, files, bars, forwards and loads all equal)"
    return None
