"""Data: loading (JSONL/JSON/Parquet/CSV files, save_to_disk folders, Hub ids), validation and tokenisation.

    examples, report = load_examples("pairs.jsonl", "pairs", skip_invalid=True)
    records, tok_report = tokenize_examples(examples, "pairs", tokenizer, max_prompt_length=256, max_length=512)

Bad input raises `DataError` naming the file, the 1-based row and the field; skipped and truncated
rows are counted in a `DataReport`. `ChatFormat` (chat.py) decides whether prompts go through the
chat template (`data.chat_template`, `data.system`). `load_tokenized` does both steps behind an optional disk cache.
"""
from .cache import load_tokenized, tokenizer_fingerprint
from .chat import CHAT_MODES, DEFAULT_CHAT, ChatFormat, end_of_turn_id, prepare_tokenizer, response_end_id
from .loading import FILE_TYPES, load_rows, read_table
from .records import DataError, DataReport, TokenizedDemo, TokenizedPair, TokenizedPrompt
from .tokenize import render_chat_prompt, tokenize_examples, tokenize_prompts, tokenize_responses
from .validation import KINDS, load_examples

__all__ = [
    "CHAT_MODES",
    "DEFAULT_CHAT",
    "FILE_TYPES",
    "KINDS",
    "ChatFormat",
    "DataError",
    "DataReport",
    "TokenizedDemo",
    "TokenizedPair",
    "TokenizedPrompt",
    "end_of_turn_id",
    "load_examples",
    "load_rows",
    "load_tokenized",
    "prepare_tokenizer",
    "read_table",
    "render_chat_prompt",
    "response_end_id",
    "tokenize_examples",
    "tokenize_prompts",
    "tokenize_responses",
    "tokenizer_fingerprint",
]
