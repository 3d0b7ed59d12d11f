"""Reward sources behind one interface: `source(prompts, completions, rows) -> Tensor (B,)` (float32, CPU).

    reward = WeightedSum([(CallableSource("distalign.rewards.verifiers:exact_answer"), 1.0),
                          (CallableSource(regex_reward, pattern=r"\\d+$"), 0.1)])
    scores = reward(["2+3="], ["5"], [{"answer": 5}])

`prompts` are the prompt texts the policy saw, `completions` the decoded responses (no special
tokens), `rows` the data rows' other columns (one dict per completion).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from distalign.config.plugins import import_callable as _import_callable
from distalign.data import ChatFormat
from distalign.models import load_reward_model, load_tokenizer, reward_scores

from . import verifiers


class RewardSource(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> Tensor: ...


def import_callable(spec: str) -> Callable:
    """'package.module:function' -> the function; errors name the spec (`config.plugins`)."""
    try:
        return _import_callable(spec)
    except ValueError as err:
        raise ValueError(f"reward function {err}") from None


def _columns(rows: list[dict]) -> dict[str, list]:
    """Row dicts -> column lists; a column missing from some rows is None there."""
    names = sorted({k for row in rows for k in row})
    return {name: [row.get(name) for row in rows] for name in names}


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


class CallableSource:
    """A Python function `fn(prompts, completions, **columns) -> list[float]`, given as an object or as
    'module:function'; `kwargs` are fixed extra keyword arguments (e.g. a regex pattern).

    Values may be Python, numpy or 0-d torch numbers (or one numpy array / tensor). Errors name the
    function and its module, and for an exception inside it the first sample that raises alone.
    """

    def __init__(self, fn: Callable | str, **kwargs: Any):
        if isinstance(fn, str):
            self.name = fn
        else:
            self.name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        self.fn = import_callable(fn) if isinstance(fn, str) else fn
        self.kwargs = kwargs

    def _call(self, prompts: list[str], completions: list[str], rows: list[dict]):
        return self.fn(prompts, completions, **{**_columns(rows), **self.kwargs})

    def _raised(self, error: Exception, prompts: list[str], completions: list[str], rows: list[dict]):
        """A one-line ValueError for an exception inside the function, naming the first sample that
        raises on its own (the function is pure by contract, so asking again per sample is safe)."""
        at = f"on the batch of {len(completions)} samples"
        for i in range(len(completions)):
            try:
                self._call(prompts[i:i + 1], completions[i:i + 1], rows[i:i + 1])
            except Exception:  # noqa: BLE001 - any failure of user code locates the sample
                at = f"on sample {i} (prompt {_clip(prompts[i])!r})"
                break
        detail = str(error).splitlines()[0] if str(error).strip() else ""
        return ValueError(f"reward function {self.name} raised {type(error).__name__}"
                          f"{': ' + detail if detail else ''} {at}")

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> Tensor:
        try:
            values = self._call(prompts, completions, rows)
        except Exception as error:  # noqa: BLE001 - user code: report it as one line, not a traceback
            raise self._raised(error, prompts, completions, rows) from None
        return torch.tensor(finite_numbers(values, len(completions), f"reward function {self.name}",
                                           "completions"), dtype=torch.float32)


def finite_numbers(values: Any, n: int, who: str, per: str) -> list[float]:
    """A user function's result as n finite floats (Python, numpy or 0-d torch numbers, or one array),
    else a one-line ValueError starting with `who`."""
    if hasattr(values, "tolist"):  # a numpy array or torch tensor
        values = values.tolist()
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{who}: returned {type(values).__name__} {_clip(repr(values))}, "
                         f"expected a list of {n} numbers")
    values = [v.item() if hasattr(v, "item") else v for v in values]
    if len(values) != n:
        raise ValueError(f"{who}: returned {len(values)} values for {n} {per}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, numbers.Real) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{who}: value {bad[0]} is {values[bad[0]]!r}, expected a finite number")
    return [float(v) for v in values]


class CallableJudge:
    """A pairwise judge `judge(prompts, a, b) -> P(a > b)` per pair, each in [0, 1], named in a config
    as 'module:function'. Its failures (an exception, a wrong count, a value outside [0, 1]) are
    one-line errors naming the function, like a reward function's."""

    def __init__(self, spec: str):
        self.name, self.fn = spec, _import_callable(spec)

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> Tensor:
        who = f"judge {self.name}"
        try:
            values = self.fn(prompts, a, b)
        except Exception as error:  # noqa: BLE001 - user code: report it as one line, not a traceback
            detail = str(error).splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"{who} raised {type(error).__name__}{': ' + detail if detail else ''} "
                             f"on a batch of {len(a)} pairs (prompt 0: {_clip(prompts[0]) if prompts else ''!r})") from None
        p = finite_numbers(values, len(a), who, "pairs")
        outside = [i for i, v in enumerate(p) if not 0.0 <= v <= 1.0]
        if outside:
            raise ValueError(f"{who}: value {outside[0]} is {p[outside[0]]!r}, expected a probability P(a > b) in [0, 1]")
        return torch.tensor(p, dtype=torch.float32)


class RewardModelSource:
    """An `AutoModelForSequenceClassification` with one label scoring the text prompt + completion.

    The text is re-tokenised with the reward model's tokenizer (it may differ from the policy's)
    exactly as the reward trainer formats pairs (`distalign.models.reward_scores`), in batches of
    `batch_size`; the score is the head's output at the last real token. Prompts go through the reward
    model's chat template as `chat_template` / `system` say (the reward run's `data.*` settings; set them
    in `rewards[i].kwargs` if that run used a system prompt).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16, chat_template: str = "auto",
                 system: str | None = None):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"reward model: expected 1 label, found {model.config.num_labels}")
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.batch_size = batch_size
        self.chat = ChatFormat(chat_template, system)
        if tokenizer.pad_token_id is None:
            raise ValueError("reward model tokenizer has no pad token; set one so the last real token can be found")
        self.model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str, trust_remote_code: bool = False, device: str | torch.device = "cpu",
                        **kwargs: Any) -> RewardModelSource:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_reward_model(path, trust_remote_code=trust_remote_code, pad_token_id=tokenizer.pad_token_id)
        return cls(model.to(device), tokenizer, **kwargs)

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> Tensor:
        return reward_scores(self.model, self.tokenizer, prompts, completions, self.batch_size, chat=self.chat)


class WeightedSum:
    """sum_k w_k R_k(prompts, completions, rows) over several sources; each part is kept for logging."""

    def __init__(self, parts: Sequence[tuple[RewardSource, float]], names: Sequence[str] | None = None):
        if not parts:
            raise ValueError("rewards: at least one reward source is required")
        self.parts = list(parts)
        self.names = list(names) if names is not None else [f"reward_{i}" for i in range(len(parts))]
        self.last_parts: dict[str, Tensor] = {}

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> Tensor:
        total = torch.zeros(len(completions))
        self.last_parts = {}
        for name, (source, weight) in zip(self.names, self.parts):
            value = source(prompts, completions, rows).float().cpu()
            self.last_parts[name] = value
            total = total + weight * value
        return total


BUILTIN = {"exact_answer": verifiers.exact_answer, "regex": verifiers.regex_reward}


def build_reward(specs: Sequence[Any], device: str | torch.device = "cpu", trust_remote_code: bool = False
                 ) -> WeightedSum:
    """Reward sources from config entries with fields kind, path, pattern, weight, kwargs.

    kind: "model" (path = reward model folder / Hub id), "callable" (path = 'module:function'),
    "exact_answer" or "regex" (the built-in verifiers; regex needs `pattern`).
    """
    parts, names = [], []
    for i, spec in enumerate(specs):
        kind, extra = spec.kind, dict(getattr(spec, "kwargs", None) or {})
        where = f"rewards[{i}]"
        if kind == "model":
            if not spec.path:
                raise ValueError(f"{where}.path: required for kind 'model' (a reward model folder or Hub id)")
            source = RewardModelSource.from_pretrained(spec.path, trust_remote_code, device, **extra)
        elif kind == "callable":
            if not spec.path:
                raise ValueError(f"{where}.path: required for kind 'callable' ('module:function')")
            source = CallableSource(spec.path, **extra)
        elif kind in BUILTIN:
            if kind == "regex":
                if not spec.pattern:
                    raise ValueError(f"{where}.pattern: required for kind 'regex'")
                extra["pattern"] = spec.pattern
            source = CallableSource(BUILTIN[kind], **extra)
        else:
            raise ValueError(f"{where}.kind: unknown reward kind {kind!r}; valid: model, callable, "
                             f"{', '.join(BUILTIN)}")
        parts.append((source, float(spec.weight)))
        names.append(getattr(spec, "name", None) or f"{kind}_{i}")
    return WeightedSum(parts, names)
