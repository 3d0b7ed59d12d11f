"""A verdict cache on disk for the LLM judge: one JSON object a line, `{"key": ..., "value": ...}`.

Appending one flushed line per verdict means an evaluation killed at any point loses at most the line
being written; a torn last line is skipped (and counted) on the next load. The key hashes the judge
model, the kind of question and the exact messages, so it covers the prompt, both responses, their
order and the prompt template. Nothing else is stored: no API key, no header, no URL.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading


def cache_key(model: str, kind: str, messages: list[dict]) -> str:
    """sha256 of (model, kind, messages) in canonical JSON."""
    canonical = json.dumps([model, kind, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class VerdictCache:
    """Thread-safe key -> value store backed by an append-only JSONL file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.skipped_lines = 0       # torn or foreign lines ignored on load
        self._values: dict[str, object] = {}
        self._lock = threading.Lock()
        self._torn_tail = False      # last line lacks its newline: start the next record on a new line
        self._load()

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                self._torn_tail = not line.endswith("\n")
                try:
                    record = json.loads(line)
                    self._values[record["key"]] = record["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped_lines += 1

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> object | None:
        with self._lock:
            return self._values.get(key)

    def put(self, key: str, value: object) -> None:
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n"
        with self._lock:
            self._values[key] = value
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n" + line if self._torn_tail else line)
                self._torn_tail = False
                handle.flush()
