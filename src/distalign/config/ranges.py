"""Valid ranges of numeric config values, written in interval notation: "(0, inf)", "[0, 1]", "[1, inf)".

One spelling for every schema field (`_f(..., range="[0, inf)")`) and for objective hyperparameters
(the registries declare theirs as the same strings): `--list-fields` shows it, and `build_dataclass`
checks every value against it when a config loads, before anything heavy happens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


def _bound(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"range bound {text!r} is not a number") from None


def _show(x: float) -> str:
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return str(int(x)) if x.is_integer() else repr(x)


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval; an infinite bound is written `inf` / `-inf`."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        match = _INTERVAL.match(text)
        if not match:
            raise ValueError(f"range {text!r}: expected interval notation such as '(0, inf)' or '[0, 1]'")
        opening, low, high, closing = match.groups()
        interval = cls(_bound(low), _bound(high), opening == "[", closing == "]")
        if interval.low > interval.high:
            raise ValueError(f"range {text!r}: the lower bound exceeds the upper one")
        return interval

    def __str__(self) -> str:
        return (f"{'[' if self.low_closed else '('}{_show(self.low)}, "
                f"{_show(self.high)}{']' if self.high_closed else ')'}")

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def requirement(self) -> str:
        """What a value must be, in words: '> 0', '>= 1', 'in [0, 1]'."""
        if math.isinf(self.high) and not self.high_closed:
            return f"{'>=' if self.low_closed else '>'} {_show(self.low)}" if not math.isinf(self.low) else "finite"
        if math.isinf(self.low) and not self.low_closed:
            return f"{'<=' if self.high_closed else '<'} {_show(self.high)}"
        return f"in {self}"

    def problem(self, value) -> str | None:
        """None when `value` lies in the range, else the one-line complaint (`must be > 0, got -1`)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type check speaks for values that are not numbers
        return None if self.contains(float(value)) else f"must be {self.requirement()}, got {value!r}"
