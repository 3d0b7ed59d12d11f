"""Data: loading (JSONL/JSON/Parquet/CSV files, save_to_disk folders, Hub ids), validation and tokenisation.

    examples, report = load_examples("pairs.jsonl", "pairs", skip_invalid=True)
    records, tok_report = tokenize_examples(examples, "pairs", tokenizer, max_prompt_length=256, max_length=512)

Bad input raises `DataError` naming the file, the 1-based row and the field; skipped and truncated
rows are counted in a `DataReport`. `load_tokenized` does both steps behind an optional disk cache.
"""
from .cache import load_tokenized, tokenizer_fingerprint
from .loading import FILE_TYPES, load_rows, read_table
from .records import DataError, DataReport, TokenizedDemo, TokenizedPair, TokenizedPrompt
from .tokenize import render_chat_prompt, tokenize_examples, tokenize_prompts, tokenize_responses
from .validation import KINDS, load_examples

__all__ = [
    "FILE_TYPES",
    "KINDS",
    "DataError",
    "DataReport",
    "TokenizedDemo",
    "TokenizedPair",
    "TokenizedPrompt",
    "load_examples",
    "load_rows",
    "load_tokenized",
    "read_table",
    "render_chat_prompt",
    "tokenize_examples",
    "tokenize_prompts",
    "tokenize_responses",
    "tokenizer_fingerprint",
]
