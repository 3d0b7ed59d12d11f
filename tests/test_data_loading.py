"""Loading raw rows: every file format, save_to_disk folders, the Hub path, and whole-file errors."""
import json

import pytest

from distalign.data import DataError, load_examples, load_rows

ROWS = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "c", "rejected": "d"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_rows_in_file_order(tmp_path):
    assert load_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS))) == ROWS


@pytest.mark.parametrize("payload", [ROWS, {"data": ROWS},
                                     {"prompt": ["p1", "p2"], "chosen": ["a", "c"], "rejected": ["b", "d"]}],
                         ids=["list", "data-key", "columns"])
def test_json_forms(tmp_path, payload):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    assert load_rows(str(path)) == ROWS


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufeffprompt,chosen,rejected\np1,a,b\n\"p2, with comma\",c,d\n", encoding="utf-8")
    assert load_rows(str(path)) == [ROWS[0], {"prompt": "p2, with comma", "chosen": "c", "rejected": "d"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_rows(str(path)) == ROWS


def test_save_to_disk_folder_and_split(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    assert load_rows(str(folder)) == ROWS
    assert load_rows(str(folder), split="test") == ROWS[:1]
    with pytest.raises(DataError) as info:
        load_rows(str(folder), split="validation")
    assert str(info.value) == f"{folder}: split 'validation' not found (available: train, test)"


def test_save_to_disk_single_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one")) == ROWS


def test_plain_folder_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"a folder must be one written by datasets.save_to_disk"):
        load_rows(str(tmp_path))


def test_hub_id_offline_gives_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline flags make load_dataset fail at once instead of retrying DNS for ~25 s
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_rows("someorg/somename")
    message = str(info.value)
    assert message.startswith("cannot load 'someorg/somename' from the Hugging Face Hub (offline?): ")
    assert "\n" not in message


def test_hub_id_uses_load_dataset_with_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_rows("org/prefs", split="train_prefs") == ROWS
    assert calls == [("org/prefs", "train_prefs")]


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError) as info:
        load_rows(str(missing))
    assert str(info.value) == f"{missing}: no such file or directory"


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}: unsupported file type '.txt' (expected .jsonl, ")


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"),
                                       ("e.json", ""), ("e.csv", "prompt,chosen,rejected\n")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: file is empty (no rows)"


def test_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": }\n')
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: line 3: invalid JSON (Expecting value at column 27)"


def test_invalid_json_document(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": 1},\n oops]')
    with pytest.raises(DataError, match=r"d\.json: invalid JSON \(Expecting value at line 2, column 2\)"):
        load_rows(str(path))


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.json"])
def test_non_utf8_bytes(tmp_path, name):
    path = tmp_path / name
    good = b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' if name == "d.jsonl" else b"prompt\nok\n"
    path.write_bytes(good + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    where = "line 2: " if name == "d.jsonl" else ""
    offset = 15 if name == "d.jsonl" else len(good) + 15
    assert str(info.value) == (f"{path}: {where}not valid UTF-8 (byte 0xe9 at offset {offset}); "
                               "re-save the file as UTF-8")


@pytest.mark.parametrize("payload,found", [("hello", "a string"), ({"prompt": "p", "chosen": "c"},
                                                                    "an object with other keys")])
def test_json_top_level_not_a_list(tmp_path, payload, found):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}: expected a JSON list of objects")
    assert str(info.value).endswith(f"at the top level, found {found}")


def test_csv_row_with_surplus_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b,extra\n")
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: row 2: has more cells than the header (3 columns)"


def test_jsonl_row_number_is_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: row 3: field 'rejected'"):
        load_examples(str(path), "pairs")
