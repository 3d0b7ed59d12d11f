"""Render prompts (plain or through the chat template) and tokenise normalised examples.

    records, report = tokenize_examples(examples, "pairs", tokenizer, max_prompt_length=256, max_length=512)

Prompt and response ids stay separate because log-probs are summed over response tokens only
(SPEC §1: logp(y|x) = sum_t log pi(y_t | x, y_<t)).
- with the chat template in use (`chat.py`: `data.chat_template` auto and the tokenizer has one, or always),
  every prompt is rendered by `apply_chat_template(messages, add_generation_prompt=True)` as text (a plain
  string as one user turn, the system prompt first if set), then tokenised with `add_special_tokens=False`
  because the template already writes its own special tokens;
- otherwise a plain prompt is `tokenizer(prompt)`, keeping the BOS the tokenizer adds (an EOS it appends
  is dropped, since the prompt does not end the sequence);
- response: `tokenizer(text, add_special_tokens=False) + [end]`, where `end` is the template's
  end-of-turn token when the template is in use (e.g. `<|im_end|>`), else EOS; or the row's exact
  `<field>_ids` verbatim when it has them (`validation`: e.g. sampled responses that a length limit cut
  before the end token).
A prompt longer than `max_prompt_length` is a `DataError` (or skipped and counted). A response that
would make prompt + response exceed `max_length` loses tokens from its end, EOS first, and the row is
counted under that field in `report.truncated`.
"""
from __future__ import annotations

from typing import Any

from .chat import DEFAULT_CHAT, ChatFormat, prompt_messages, response_end_id
from .records import DataError, DataReport, TokenizedDemo, TokenizedPair, TokenizedPrompt
from .validation import KINDS, Where

RESPONSE_FIELDS = {"pairs": ("chosen", "rejected"), "demonstrations": ("completion",), "prompts": ()}


def tokenize_examples(examples: list[dict], kind: str, tokenizer, *, max_prompt_length: int, max_length: int,
                      skip_invalid: bool = False, source_name: str | None = None, chat: ChatFormat = DEFAULT_CHAT
                      ) -> tuple[list[TokenizedPair | TokenizedDemo | TokenizedPrompt], DataReport]:
    """Tokenise examples from `load_examples`; returns the records and a report of skips and truncations.
    `chat` says whether prompts go through the chat template and with which system prompt."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, found {kind!r}")
    # Prompts carry no response, so their max_length is never read and need not exceed the prompt limit.
    if max_prompt_length <= 0 or (RESPONSE_FIELDS[kind] and max_length <= max_prompt_length):
        raise ValueError(f"max_length: must exceed max_prompt_length, which must be > 0 "
                         f"(found max_length={max_length}, max_prompt_length={max_prompt_length})")
    end = response_end_id(tokenizer, chat)
    wheres = [Where(source_name or ex.get("_source") or "<data>", ex.get("_row", i + 1))
              for i, ex in enumerate(examples)]
    report = DataReport(source=wheres[0].source if wheres else (source_name or ""), rows_read=len(examples))
    prompt_ids = tokenize_prompts([ex["prompt"] for ex in examples], tokenizer, wheres, chat=chat)
    response_ids = {f: _response_ids(examples, f, tokenizer, wheres, end) for f in RESPONSE_FIELDS[kind]}
    records = []
    for i, example in enumerate(examples):
        try:
            check_prompt_length(prompt_ids[i], max_prompt_length, wheres[i])
        except DataError as error:
            if not skip_invalid:
                raise
            report.skip(error)
            continue
        budget = max_length - len(prompt_ids[i])
        responses = {}
        for field_name, ids in response_ids.items():
            if len(ids[i]) > budget:
                report.truncate(field_name)
            responses[field_name] = ids[i][:budget]
        records.append(_record(kind, prompt_ids[i], responses, example))
    return records, report


def check_prompt_length(ids: list[int], max_prompt_length: int, where: Where) -> None:
    if not ids:
        raise where.error("prompt", "expected at least one token, found none after tokenisation", "empty prompt")
    if len(ids) > max_prompt_length:
        raise where.error("prompt", f"expected at most {max_prompt_length} tokens (max_prompt_length), "
                          f"found {len(ids)}", "prompt too long")


def tokenize_prompts(prompts: list[str | list[dict]], tokenizer, wheres: list[Where] | None = None, *,
                     chat: ChatFormat = DEFAULT_CHAT) -> list[list[int]]:
    """Ids of each prompt; raw strings and rendered chat prompts go through the tokenizer in two batches."""
    wheres = wheres or [Where("<prompts>", i + 1) for i in range(len(prompts))]
    templated = chat.applies(tokenizer)
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str) and not templated]
    rendered = [i for i, p in enumerate(prompts) if templated or not isinstance(p, str)]
    ids: list[list[int]] = [[] for _ in prompts]
    plain_ids = _batch_ids(tokenizer, [prompts[i] for i in plain], add_special_tokens=True)
    drop_eos = _appends_eos(tokenizer)
    for i, row_ids in zip(plain, plain_ids):
        ids[i] = row_ids[:-1] if drop_eos and row_ids and row_ids[-1] == tokenizer.eos_token_id else row_ids
    texts = [render_chat_prompt(prompts[i], tokenizer, wheres[i], chat) for i in rendered]
    for i, row_ids in zip(rendered, _batch_ids(tokenizer, texts, add_special_tokens=False)):
        ids[i] = row_ids
    return ids


def render_chat_prompt(prompt: str | list[dict], tokenizer, where: Where, chat: ChatFormat = DEFAULT_CHAT) -> str:
    """The chat template's text for `prompt` (messages, or a string as one user turn), ending with the cue
    for the assistant's turn."""
    if chat.mode == "never" and not isinstance(prompt, str):
        raise where.error("prompt", "expected a plain string because data.chat_template is 'never', found chat "
                          "messages (set data.chat_template to auto)", "chat messages with chat_template never")
    if not getattr(tokenizer, "chat_template", None):
        raise where.error("prompt", "expected a plain string because the tokenizer has no chat_template, "
                          "found chat messages (set tokenizer.chat_template or use a chat model's tokenizer)",
                          "no chat template")
    return tokenizer.apply_chat_template(prompt_messages(prompt, chat), tokenize=False, add_generation_prompt=True)


def tokenize_responses(texts: list[str], tokenizer, end_id: int | None = None) -> list[list[int]]:
    """Ids of each response followed by `end_id` (default: EOS), so the model learns where the answer stops."""
    end = tokenizer.eos_token_id if end_id is None else end_id
    return [ids + [end] for ids in _batch_ids(tokenizer, texts, add_special_tokens=False)]


def _response_ids(examples: list[dict], field_name: str, tokenizer, wheres: list[Where],
                  end_id: int | None = None) -> list[list[int]]:
    """Each example's ids of `field_name`: its exact `<field>_ids` where given (each id inside the
    tokenizer's vocabulary), else the tokenised text + the end token (`tokenize_responses`)."""
    key, vocab = f"{field_name}_ids", len(tokenizer)
    for example, where in zip(examples, wheres):
        if key in example and max(example[key]) >= vocab:
            raise where.error(key, f"expected token ids below the vocabulary size {vocab}, found "
                              f"{max(example[key])}", "bad token ids")
    ids = tokenize_responses([ex[field_name] for ex in examples if key not in ex], tokenizer, end_id)[::-1]
    return [list(ex[key]) if key in ex else ids.pop() for ex in examples]


def _batch_ids(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _appends_eos(tokenizer) -> bool:
    """Whether `tokenizer(text)` ends with an EOS it added itself (some post-processors do)."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return bool(with_special) and with_special[-1] == eos and (not without or without[-1] != eos)


def _record(kind: str, prompt_ids: list[int], responses: dict[str, list[int]], example: dict[str, Any]):
    if kind == "pairs":
        return TokenizedPair(prompt_ids, responses["chosen"], responses["rejected"])
    if kind == "demonstrations":
        return TokenizedDemo(prompt_ids, responses["completion"])
    return TokenizedPrompt(prompt_ids, example["prompt"], dict(example.get("extra", {})))
