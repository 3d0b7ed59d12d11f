"""A disk cache of tokenised data, so repeated runs on a large file skip validation and tokenisation.

    records, load_report, tok_report = load_tokenized("pairs.jsonl", "pairs", tokenizer, cache_dir=".cache",
                                                      max_prompt_length=256, max_length=512)

The key hashes everything the result depends on: the data bytes (a file, or every file of a
`save_to_disk` folder), kind, split, limits, `skip_invalid`, the chat format, and the tokenizer (its vocabulary and
rules, chat template, and special ids). Hub ids are not cached here; `datasets` caches their download.
Entries are JSON, written to a temporary file and renamed, so a crash never leaves half an entry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .chat import DEFAULT_CHAT, ChatFormat
from .files import write_text_atomic
from .records import DataReport, TokenizedDemo, TokenizedPair, TokenizedPrompt
from .tokenize import tokenize_examples
from .validation import load_examples

_RECORD_TYPES = {"pairs": TokenizedPair, "demonstrations": TokenizedDemo, "prompts": TokenizedPrompt}


def load_tokenized(source: str, kind: str, tokenizer, *, cache_dir: str | None, max_prompt_length: int,
                   max_length: int, split: str = "train", skip_invalid: bool = False,
                   chat: ChatFormat = DEFAULT_CHAT):
    """`load_examples` + `tokenize_examples`, reusing a cached result when nothing it depends on changed.

    Returns `(records, load_report, tokenize_report)`; `cache_dir=None` disables the cache.
    """
    settings = {"kind": kind, "split": split, "skip_invalid": skip_invalid,
                "max_prompt_length": max_prompt_length, "max_length": max_length,
                "chat_template": chat.mode, "system": chat.system}
    entry = _entry_path(cache_dir, source, settings, tokenizer) if cache_dir else None
    if entry is not None and entry.exists():
        return _read_entry(entry, kind)
    examples, load_report = load_examples(source, kind, split=split, skip_invalid=skip_invalid)
    records, tok_report = tokenize_examples(examples, kind, tokenizer, max_prompt_length=max_prompt_length,
                                            max_length=max_length, skip_invalid=skip_invalid, source_name=source,
                                            chat=chat)
    if entry is not None:
        _write_entry(entry, records, load_report, tok_report)
    return records, load_report, tok_report


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the ids: the backend's full JSON, the chat template and the special ids."""
    parts = [tokenizer.backend_tokenizer.to_str(), str(getattr(tokenizer, "chat_template", None)),
             str(tokenizer.bos_token_id), str(tokenizer.eos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _entry_path(cache_dir: str, source: str, settings: dict, tokenizer) -> Path | None:
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return Path(cache_dir) / f"{path.name}-{settings['kind']}-{digest.hexdigest()[:24]}.json"


def _write_entry(entry: Path, records, load_report: DataReport, tok_report: DataReport) -> None:
    payload = {"records": [dataclasses.asdict(r) for r in records],
               "load_report": dataclasses.asdict(load_report), "tokenize_report": dataclasses.asdict(tok_report)}
    try:
        text = json.dumps(payload)
    except TypeError:
        return  # extra columns that JSON cannot hold (dates, bytes): such data is simply not cached
    write_text_atomic(entry, text)


def _read_entry(entry: Path, kind: str):
    payload = json.loads(entry.read_text(encoding="utf-8"))
    record_type = _RECORD_TYPES[kind]
    records = [record_type(**r) for r in payload["records"]]
    return records, DataReport(**payload["load_report"]), DataReport(**payload["tokenize_report"])
