"""Check raw rows against their data kind and normalise them.

    examples, report = load_examples("pairs.jsonl", "pairs", skip_invalid=True)
    print(report.summary())

Normalised rows (every kind also keeps `_row`, 1-based, and `_source` for later messages):
- demonstrations: `{"prompt", "completion"}` from prompt/completion columns or chat `messages`
  whose last message is the assistant's (the earlier messages become the prompt);
- pairs: `{"prompt", "chosen", "rejected"}`; without a `prompt` field, `chosen` and `rejected` may be
  whole conversations sharing their opening messages (TRL's "implicit prompt" format): the shared
  messages become the prompt and what follows the responses;
- prompts: `{"prompt", "extra"}`, where `extra` holds the row's other columns for reward functions.
A prompt is a string or a list of `{role, content}` messages; responses become the assistant's
text. A response given as messages makes a string prompt into one user message, so the row is
rendered with the chat template. Message fields are named like `prompt[2].role` (0-based index).
A response may also come as exact token ids in `<field>_ids` (`chosen_ids`, `rejected_ids`,
`completion_ids`: non-empty lists of token ids), kept beside the text; tokenisation then uses them
verbatim (no EOS appended), so a sampled response cut at a length limit stays cut and a sequence
that text would re-tokenise differently stays the sequence that was sampled.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .loading import read_table
from .records import DataError, DataReport, row_error, type_name

KINDS = ("demonstrations", "pairs", "prompts")
ROLES = ("system", "user", "assistant", "tool")
_REQUIRED_COLUMNS = {"pairs": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
                     "demonstrations": [("prompt", "completion"), ("messages",)],
                     "prompts": [("prompt",)]}


class Where(NamedTuple):
    """The file and 1-based row a value came from, to put in error messages."""

    source: str
    row: int

    def error(self, field_name: str, problem: str, reason: str) -> DataError:
        return row_error(self.source, self.row, field_name, problem, reason)


def load_examples(source: str, kind: str, *, split: str = "train",
                  skip_invalid: bool = False) -> tuple[list[dict], DataReport]:
    """Read, validate and normalise the rows of `source`; bad rows raise, or are skipped and counted."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, found {kind!r}")
    table = read_table(source, split, skip_invalid=skip_invalid)
    if table.columns is not None:
        check_columns(table.name, table.columns, kind)
    report = DataReport(source=table.name, rows_read=len(table.rows))
    examples = []
    for row_number, row in table.rows:
        try:
            if isinstance(row, DataError):
                raise row
            examples.append(normalise_row(row, kind, Where(table.name, row_number)))
        except DataError as error:
            if not skip_invalid:
                raise
            report.skip(error)
    return examples, report


def check_columns(source: str, columns: list[str], kind: str) -> None:
    """A columnar file (CSV, Parquet, datasets) missing a needed column fails once, not on every row."""
    options = _REQUIRED_COLUMNS[kind]
    if any(all(c in columns for c in option) for option in options):
        return
    missing = [c for c in options[0] if c not in columns]
    alternative = " (or a 'messages' column)" if kind == "demonstrations" else ""
    raise DataError(f"{source}: missing column{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(c) for c in missing)}{alternative}; "
                    f"columns found: {', '.join(columns) or '(none)'}", reason="missing column")


def normalise_row(row: Any, kind: str, where: Where) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where.source}: row {where.row}: expected an object with fields, found {type_name(row)}",
                        reason="wrong type")
    normalise = {"pairs": _pair, "demonstrations": _demonstration, "prompts": _prompt_row}[kind]
    return {**normalise(row, where), "_row": where.row, "_source": where.source}


def _pair(row: dict, where: Where) -> dict:
    if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        prompt = implicit_prompt(row["chosen"], row["rejected"], where)
    else:
        prompt = parse_prompt(_field(row, "prompt", where, also="(or chat 'chosen' / 'rejected' sharing a prompt)"),
                              where)
    chosen, chosen_chat = parse_response(_field(row, "chosen", where), "chosen", prompt, where)
    rejected, rejected_chat = parse_response(_field(row, "rejected", where), "rejected", prompt, where)
    if chosen == rejected:
        raise where.error("rejected", "expected a response different from 'chosen', found the same text",
                          "identical responses")
    return {"prompt": _as_chat(prompt) if chosen_chat or rejected_chat else prompt,
            "chosen": chosen, "rejected": rejected, **_token_ids(row, ("chosen", "rejected"), where)}


def implicit_prompt(chosen: list, rejected: list, where: Where) -> list[dict]:
    """The messages two conversations open with, which must end before the assistant's replies differ."""
    chosen = _messages(chosen, "chosen", where)
    rejected = _messages(rejected, "rejected", where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise where.error("chosen", "expected 'chosen' and 'rejected' conversations that open with the same "
                          "prompt messages (there is no 'prompt' field), found no shared first message",
                          "no shared prompt")
    if shared == len(chosen) or shared == len(rejected):
        raise where.error("rejected", "expected a reply after the shared prompt messages, found "
                          f"{'identical conversations' if len(chosen) == len(rejected) else 'none'}",
                          "no shared prompt")
    return parse_prompt(chosen[:shared], where, "chosen")


def _demonstration(row: dict, where: Where) -> dict:
    if "completion" not in row and "messages" in row:
        messages = _messages(row["messages"], "messages", where)
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise where.error("messages", "expected the last message to be the assistant's reply, "
                              f"found role '{messages[last]['role']}'", "bad chat message")
        if last == 0:
            raise where.error("messages", "expected at least one message before the assistant's reply, "
                              "found only the reply", "bad chat message")
        completion = _check_text(messages[last]["content"], f"messages[{last}].content", where)
        return {"prompt": messages[:last], "completion": completion}
    prompt = parse_prompt(_field(row, "prompt", where, also="or a 'messages' list"), where)
    completion, is_chat = parse_response(_field(row, "completion", where, also="or a 'messages' list"),
                                         "completion", prompt, where)
    return {"prompt": _as_chat(prompt) if is_chat else prompt, "completion": completion,
            **_token_ids(row, ("completion",), where)}


def _token_ids(row: dict, fields: tuple[str, ...], where: Where) -> dict:
    """The optional exact ids of responses: `{field}_ids` -> a non-empty list of non-negative ints."""
    found = {}
    for name in (f"{f}_ids" for f in fields):
        if name not in row:
            continue
        ids = row[name]
        if not isinstance(ids, list) or not ids:
            raise where.error(name, f"expected a non-empty list of token ids, found {type_name(ids)}"
                              f"{' (empty)' if isinstance(ids, list) else ''}", "bad token ids")
        bad = next((i for i, v in enumerate(ids) if type(v) is not int or v < 0), None)
        if bad is not None:
            raise where.error(f"{name}[{bad}]", f"expected a non-negative integer token id, found "
                              f"{type_name(ids[bad])} {ids[bad]!r}", "bad token ids")
        found[name] = ids
    return found


def _prompt_row(row: dict, where: Where) -> dict:
    prompt = parse_prompt(_field(row, "prompt", where), where)
    return {"prompt": prompt, "extra": {k: v for k, v in row.items() if k != "prompt"}}


def _field(row: dict, name: str, where: Where, also: str = "") -> Any:
    if name not in row:
        fields = ", ".join(map(str, row)) or "none"
        raise where.error(name, f"expected this field{' ' + also if also else ''}, "
                          f"found it missing (fields: {fields})", "missing field")
    return row[name]


def parse_prompt(value: Any, where: Where, field_name: str = "prompt") -> str | list[dict]:
    """A non-blank string, or a non-empty message list that does not end with the assistant."""
    if isinstance(value, str):
        if not value.strip():
            raise where.error(field_name, f"expected a non-empty prompt, found {_blank(value)}", "empty prompt")
        return value
    if not isinstance(value, list):
        raise where.error(field_name, f"expected a string or a list of chat messages, found {type_name(value)}",
                          "wrong type")
    messages = _messages(value, field_name, where)
    if messages[-1]["role"] == "assistant":
        raise where.error(f"{field_name}[{len(messages) - 1}].role", "expected the prompt to end with a "
                          "user, system or tool message, found 'assistant'", "bad chat message")
    return messages


def parse_response(value: Any, field_name: str, prompt: str | list, where: Where) -> tuple[str, bool]:
    """The assistant's text and whether it came as chat messages.

    Messages may repeat the prompt's messages before the reply (a common export format); those are
    dropped. Any other multi-message response is an error, since only the reply is scored.
    """
    if isinstance(value, str):
        return _check_text(value, field_name, where), False
    if not isinstance(value, list):
        raise where.error(field_name, f"expected a string or a list of chat messages, found {type_name(value)}",
                          "wrong type")
    messages = _messages(value, field_name, where)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise where.error(field_name, "expected messages ending with the assistant's reply, "
                          f"found last role '{messages[last]['role']}'", "bad chat message")
    if last > 0 and messages[:last] != (prompt if isinstance(prompt, list) else _as_chat(prompt)):
        raise where.error(field_name, "expected one assistant message (optionally after the prompt's messages), "
                          f"found {len(messages)} messages that do not start with the prompt", "bad chat message")
    return _check_text(messages[last]["content"], f"{field_name}[{last}].content", where), True


def _messages(value: Any, field_name: str, where: Where) -> list[dict]:
    if not isinstance(value, list):
        raise where.error(field_name, f"expected a list of chat messages, found {type_name(value)}", "wrong type")
    if not value:
        raise where.error(field_name, "expected at least one chat message, found an empty list", "bad chat message")
    for i, message in enumerate(value):
        name = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise where.error(name, f"expected a {{role, content}} object, found {type_name(message)}",
                              "bad chat message")
        for key in ("role", "content"):
            if key not in message:
                raise where.error(f"{name}.{key}", f"expected a '{key}' key, found keys: {', '.join(message)}",
                                  "bad chat message")
            if not isinstance(message[key], str):
                raise where.error(f"{name}.{key}", f"expected a string, found {type_name(message[key])}",
                                  "bad chat message")
        if message["role"] not in ROLES:
            raise where.error(f"{name}.role", f"expected one of {', '.join(ROLES)}, found '{message['role']}'",
                              "bad chat message")
    return value


def _check_text(value: str, field_name: str, where: Where) -> str:
    if not value.strip():
        raise where.error(field_name, f"expected a non-empty response, found {_blank(value)}", "empty response")
    return value


def _blank(value: str) -> str:
    return "an empty string" if not value else f"only whitespace ({value!r})"


def _as_chat(prompt: str | list[dict]) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
