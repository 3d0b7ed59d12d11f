"""Read raw rows from a JSONL / JSON / Parquet / CSV file, a `save_to_disk` folder, or a Hub dataset id.

    rows = load_rows("data/pairs.jsonl")
    rows = load_rows("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")

Rows are numbered from 1 in file order (for CSV the header is not a row; for JSONL row n is line n). A file is one split, so
`split` only matters for folders and Hub ids. Problems raise `DataError` naming the file (and the
line for JSONL); `skip_invalid` lets unparseable JSONL lines be skipped and counted instead.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import DataError, type_name

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
# "name" or "org/name" with no file extension; anything else that does not exist is a missing path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class RawTable:
    """`(row_number, row)` pairs as read, and the column names when the format has a schema.

    With `skip_invalid`, a JSONL line that cannot be parsed keeps its row number and holds the
    `DataError` in place of the row, so the caller can count it.
    """

    name: str
    rows: list[tuple[int, dict[str, Any] | DataError]]
    columns: list[str] | None = None


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Every row of `source` as a dict; raises `DataError` on the first problem."""
    return [row for _, row in read_table(source, split).rows]


def read_table(source: str, split: str = "train", *, skip_invalid: bool = False) -> RawTable:
    """Dispatch on what `source` is: a file by extension, a `save_to_disk` folder, else a Hub id."""
    path = Path(source)
    if path.is_dir():
        table = _read_saved_folder(path, split)
    elif path.is_file():
        table = _read_file(path, skip_invalid)
    elif _looks_like_hub_id(source):
        table = _read_hub(source, split)
    else:
        raise DataError(f"{source}: no such file or directory", reason="missing source")
    if not table.rows:
        raise DataError(f"{table.name}: file is empty (no rows)", reason="empty source")
    return table


def _looks_like_hub_id(source: str) -> bool:
    has_file_suffix = Path(source).suffix.lower() in FILE_TYPES
    return bool(_HUB_ID.match(source)) and not has_file_suffix and not source.startswith(".")


def _read_file(path: Path, skip_invalid: bool) -> RawTable:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, skip_invalid)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type '{suffix or '(none)'}' "
                    f"(expected {', '.join(FILE_TYPES)}, or a folder saved by datasets.save_to_disk)",
                    reason="unsupported source")


def _decode(path: Path, data: bytes, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"line {line}: " if line is not None else ""
        bad = data[exc.start:exc.start + 1].hex()
        raise DataError(f"{path}: {where}not valid UTF-8 (byte 0x{bad} at offset {exc.start}); "
                        "re-save the file as UTF-8", reason="invalid encoding") from None


def _read_jsonl(path: Path, skip_invalid: bool) -> RawTable:
    """Row n is line n, so a message's row number is where an editor shows it; blank lines hold no row."""
    table = RawTable(str(path), [])
    for line_number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            text = _decode(path, raw, line_number)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_number}: invalid JSON ({exc.msg} at column {exc.colno})",
                                reason="invalid JSON") from None
        except DataError as error:
            if not skip_invalid:
                raise
            value = error
        table.rows.append((line_number, value))
    return table


def _read_json(path: Path) -> RawTable:
    text = _decode(path, path.read_bytes())
    if not text.strip():
        return RawTable(str(path), [])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                        reason="invalid JSON") from None
    return RawTable(str(path), list(enumerate(_json_rows(path, value), 1)))


def _json_rows(path: Path, value: Any) -> list[dict]:
    """Accept a list of objects, `{"data": [...]}` (or "rows"/"examples"), or a dict of equal-length columns."""
    if isinstance(value, dict):
        for key in ("data", "rows", "examples"):
            if isinstance(value.get(key), list):
                return value[key]
        columns = list(value.values())
        if columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            return [dict(zip(value, cells)) for cells in zip(*columns)]
    if isinstance(value, list):
        return value
    found = "an object with other keys" if isinstance(value, dict) else type_name(value)
    raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}, or a dict of "
                    f"equal-length column lists) at the top level, found {found}", reason="invalid JSON")


def _read_csv(path: Path) -> RawTable:
    text = _decode(path, path.read_bytes()).removeprefix("\ufeff")  # spreadsheet exports start with a BOM
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        if None in row:  # DictReader files surplus cells under the key None
            raise DataError(f"{path}: row {len(rows) + 1}: has more cells than the header "
                            f"({len(reader.fieldnames)} columns)", reason="invalid CSV")
        rows.append(row)
    return RawTable(str(path), list(enumerate(rows, 1)), columns=list(reader.fieldnames or []))


def _read_parquet(path: Path) -> RawTable:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: cannot read as Parquet ({_first_line(exc)})", reason="invalid parquet") from None
    return RawTable(str(path), list(enumerate(table.to_pylist(), 1)), columns=table.column_names)


def _read_saved_folder(path: Path, split: str) -> RawTable:
    import datasets

    if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        raise DataError(f"{path}: a folder must be one written by datasets.save_to_disk "
                        "(no dataset_dict.json or state.json in it)", reason="unsupported source")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load the save_to_disk folder ({_first_line(exc)})",
                        reason="unsupported source") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: split '{split}' not found (available: {', '.join(loaded)})",
                            reason="missing split")
        loaded = loaded[split]
    return RawTable(str(path), list(enumerate(loaded.to_list(), 1)), columns=list(loaded.column_names))


def _read_hub(source: str, split: str) -> RawTable:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001 -- connection, auth, missing repo or split: all "cannot use this id"
        raise DataError(f"cannot load '{source}' from the Hugging Face Hub (offline?): {_first_line(exc)}",
                        reason="hub unavailable") from None
    return RawTable(source, list(enumerate(loaded.to_list(), 1)), columns=list(loaded.column_names))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

