"""Chat formatting: when prompts go through the tokenizer's chat template, and which token ends a response.

    chat = ChatFormat("auto", system="Answer briefly.")
    prepare_tokenizer(tokenizer, chat)          # EOS := the template's end-of-turn token (e.g. <|im_end|>)
    prompt_messages("What is 2+2?", chat)       # [{"role": "system", ...}, {"role": "user", "content": ...}]

`mode` (config `data.chat_template`):
- "auto": use the template when the tokenizer has one (chat models), feed text raw otherwise;
- "always": use it, and refuse a tokenizer without one;
- "never": plain-string prompts go in raw (a base model whose tokenizer happens to carry a template);
  chat-message rows and a system prompt are then refused, since they only exist through a template.
With the template in use, a plain-string prompt is one user turn (after the system prompt, if one is
set) followed by the generation prompt, and a response ends with the token the template closes an
assistant turn with. That token becomes the tokenizer's EOS (as TRL's `clone_chat_template` does), so
the training data, the samplers' stop token and the online trainers' missing-EOS check all agree, and
the saved tokenizer stops there too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHAT_MODES = ("auto", "always", "never")
_SENTINEL = "\u2063distalign-end-of-turn-probe\u2063"


@dataclass(frozen=True)
class ChatFormat:
    """How prompts are rendered: `mode` (auto | always | never) and an optional system prompt. Errors name
    the fields as `field_prefix` + chat_template / system (a run's config says "data.")."""

    mode: str = "auto"
    system: str | None = None
    field_prefix: str = field(default="", compare=False)

    def __post_init__(self):
        where = self.field_prefix
        if self.mode not in CHAT_MODES:
            raise ValueError(f"{where}chat_template: must be one of {list(CHAT_MODES)}, got {self.mode!r}")
        if self.system is not None and self.mode == "never":
            raise ValueError(f"{where}system: a system prompt needs the chat template, but {where}chat_template "
                             "is 'never'")

    def applies(self, tokenizer) -> bool:
        """Whether prompts go through `tokenizer`'s chat template; "always" without one is an error."""
        has_template, where = bool(getattr(tokenizer, "chat_template", None)), self.field_prefix
        if self.mode == "always" and not has_template:
            raise ValueError(f"{where}chat_template: 'always', but the tokenizer {tokenizer.name_or_path!r} has no "
                             "chat template (use 'auto' or 'never', or a chat model's tokenizer)")
        if self.system is not None and not has_template:
            raise ValueError(f"{where}system: a system prompt needs a chat template, and the tokenizer "
                             f"{tokenizer.name_or_path!r} has none")
        return has_template and self.mode != "never"


DEFAULT_CHAT = ChatFormat()


def prompt_messages(prompt: str | list[dict], chat: ChatFormat) -> list[dict]:
    """The chat turns of a prompt: a plain string is one user turn; the system prompt goes first unless the
    messages bring their own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chat.system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": chat.system}, *messages]
    return messages


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's reply, else None.

    Found by rendering a user turn and a reply and reading the first special token after the reply's text,
    so it works for any template (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...) without a table.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation (jinja raise_exception): no marker known
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    tail = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((token for token in tail if token in special), None)


def response_end_id(tokenizer, chat: ChatFormat) -> int:
    """The id every response ends with: the template's end-of-turn token when it is used, else EOS."""
    end = end_of_turn_id(tokenizer) if chat.applies(tokenizer) else None
    if end is not None:
        return end
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token before tokenising responses")
    return tokenizer.eos_token_id


def prepare_tokenizer(tokenizer, chat: ChatFormat):
    """Make `tokenizer`'s EOS the token responses end with under `chat` (module docstring); returns it."""
    end = response_end_id(tokenizer, chat)
    if end != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
