"""The data package's vocabulary: its error type, its report, and the tokenised records.

Every bad input becomes one `DataError` whose message names the file, the 1-based row and the field;
every row that is skipped or truncated is counted in a `DataReport`, so nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """A malformed data file or row; the message is one line.

    Row problems read `"{file}: row {n}: field '{field}': {expected}, found {found}"`,
    whole-file problems `"{file}: {problem}"`. `reason` is a short key ("missing field",
    "empty response", ...) under which `skip_invalid` counts the row.
    """

    def __init__(self, message: str, *, reason: str = "invalid row"):
        super().__init__(" ".join(message.splitlines()))  # one line, whatever an inner message held
        self.reason = reason


def type_name(value: Any) -> str:
    """How a JSON-ish value reads in an error message: "an integer", "null", "a list"."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def row_error(source: str, row: int, field_name: str, problem: str, reason: str) -> DataError:
    return DataError(f"{source}: row {row}: field '{field_name}': {problem}", reason=reason)


@dataclass
class DataReport:
    """What happened to the rows of one source: read, skipped (by reason) and truncated (by field)."""

    source: str = ""
    rows_read: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)  # reason -> first message, to show the user

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.rows_skipped.values())

    def skip(self, error: DataError) -> None:
        self.rows_skipped[error.reason] = self.rows_skipped.get(error.reason, 0) + 1
        self.first_errors.setdefault(error.reason, str(error))

    def truncate(self, field_name: str) -> None:
        self.truncated[field_name] = self.truncated.get(field_name, 0) + 1

    def summary(self) -> str:
        """One line, e.g. `read 10 rows, kept 8; skipped 2 (empty response: 2); truncated chosen: 1`."""
        parts = [f"read {self.rows_read} rows, kept {self.rows_kept}"]
        if self.rows_skipped:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.rows_skipped.items()))
            parts.append(f"skipped {sum(self.rows_skipped.values())} ({detail})")
        if self.truncated:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.truncated.items()))
            parts.append(f"truncated {detail}")
        return "; ".join(parts)


@dataclass
class TokenizedPair:
    """A preference pair; each response ends with EOS unless it was truncated (then it is counted)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class TokenizedDemo:
    """A demonstration; `completion_ids` ends with EOS unless truncated."""

    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class TokenizedPrompt:
    """A prompt for online methods; `prompt` is the original string or message list, `extra` the other columns."""

    prompt_ids: list[int]
    prompt: Any
    extra: dict[str, Any] = field(default_factory=dict)
