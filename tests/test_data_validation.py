"""Row validation and normalisation: each malformed row names its file, 1-based row and field."""
import json

import pytest

from distalign.data import DataError, load_examples

PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def error_of(tmp_path, bad_row, kind="pairs"):
    """The message for a file whose second row is `bad_row` (the first is valid)."""
    good = PAIR if kind != "demonstrations" else {"prompt": "p", "completion": "c"}
    path = write_jsonl(tmp_path, [good, bad_row])
    with pytest.raises(DataError) as info:
        load_examples(path, kind)
    return str(info.value).removeprefix(path + ": ")


def test_pairs_normalised_with_row_and_source(tmp_path):
    path = write_jsonl(tmp_path, [PAIR, {**PAIR, "prompt": "q", "score": 3}])
    examples, report = load_examples(path, "pairs")
    assert examples == [{**PAIR, "_row": 1, "_source": path}, {**PAIR, "prompt": "q", "_row": 2, "_source": path}]
    assert (report.rows_read, report.rows_kept, report.rows_skipped, report.truncated) == (2, 2, {}, {})


def test_missing_field(tmp_path):
    assert error_of(tmp_path, {"prompt": "p", "chosen": "a"}) == (
        "row 2: field 'rejected': expected this field, found it missing (fields: prompt, chosen)")


def test_wrong_type_int_prompt(tmp_path):
    assert error_of(tmp_path, {**PAIR, "prompt": 7}) == (
        "row 2: field 'prompt': expected a string or a list of chat messages, found an integer")


def test_null_response(tmp_path):
    assert error_of(tmp_path, {**PAIR, "chosen": None}) == (
        "row 2: field 'chosen': expected a string or a list of chat messages, found null")


def test_empty_response(tmp_path):
    assert error_of(tmp_path, {**PAIR, "chosen": ""}) == (
        "row 2: field 'chosen': expected a non-empty response, found an empty string")


def test_whitespace_only_response(tmp_path):
    assert error_of(tmp_path, {**PAIR, "rejected": " \n\t"}) == (
        "row 2: field 'rejected': expected a non-empty response, found only whitespace (' \\n\\t')")


def test_empty_prompt(tmp_path):
    assert error_of(tmp_path, {**PAIR, "prompt": ""}) == (
        "row 2: field 'prompt': expected a non-empty prompt, found an empty string")


def test_chosen_equals_rejected(tmp_path):
    assert error_of(tmp_path, {**PAIR, "rejected": "good"}) == (
        "row 2: field 'rejected': expected a response different from 'chosen', found the same text")


def test_unknown_chat_role(tmp_path):
    assert error_of(tmp_path, {**PAIR, "prompt": [USER, {"role": "bot", "content": "x"}]}) == (
        "row 2: field 'prompt[1].role': expected one of system, user, assistant, tool, found 'bot'")


def test_chat_message_missing_content(tmp_path):
    assert error_of(tmp_path, {**PAIR, "chosen": [{"role": "assistant", "text": "x"}]}) == (
        "row 2: field 'chosen[0].content': expected a 'content' key, found keys: role, text")


def test_chat_content_not_a_string(tmp_path):
    assert error_of(tmp_path, {**PAIR, "prompt": [{"role": "user", "content": ["part"]}]}) == (
        "row 2: field 'prompt[0].content': expected a string, found a list")


def test_prompt_ending_with_assistant(tmp_path):
    assert error_of(tmp_path, {**PAIR, "prompt": [USER, ASSISTANT]}) == (
        "row 2: field 'prompt[1].role': expected the prompt to end with a user, system or tool message, "
        "found 'assistant'")


def test_response_messages_not_ending_with_assistant(tmp_path):
    assert error_of(tmp_path, {**PAIR, "chosen": [USER]}) == (
        "row 2: field 'chosen': expected messages ending with the assistant's reply, found last role 'user'")


def test_demo_messages_not_ending_with_assistant(tmp_path):
    assert error_of(tmp_path, {"messages": [USER, ASSISTANT, USER]}, kind="demonstrations") == (
        "row 2: field 'messages': expected the last message to be the assistant's reply, found role 'user'")


def test_demo_messages_with_only_the_reply(tmp_path):
    assert error_of(tmp_path, {"messages": [ASSISTANT]}, kind="demonstrations") == (
        "row 2: field 'messages': expected at least one message before the assistant's reply, found only the reply")


def test_demo_missing_completion(tmp_path):
    assert error_of(tmp_path, {"prompt": "p"}, kind="demonstrations") == (
        "row 2: field 'completion': expected this field or a 'messages' list, found it missing (fields: prompt)")


def test_row_not_an_object(tmp_path):
    assert error_of(tmp_path, ["p", "a", "b"]) == "row 2: expected an object with fields, found a list"


def test_demo_from_messages(tmp_path):
    path = write_jsonl(tmp_path, [{"messages": [{"role": "system", "content": "be brief"}, USER, ASSISTANT]}])
    examples, _ = load_examples(path, "demonstrations")
    assert examples == [{"prompt": [{"role": "system", "content": "be brief"}, USER], "completion": "hello",
                         "_row": 1, "_source": path}]


def test_chat_pairs_string_prompt_becomes_user_message(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "hi", "chosen": [ASSISTANT], "rejected": "plain"},
                                  {"prompt": [USER], "chosen": [USER, ASSISTANT],
                                   "rejected": [USER, {"role": "assistant", "content": "bye"}]}])
    examples, _ = load_examples(path, "pairs")
    # the second row repeats the prompt inside each response (a common export); only the reply is kept
    assert [(e["prompt"], e["chosen"], e["rejected"]) for e in examples] == [
        ([USER], "hello", "plain"), ([USER], "hello", "bye")]


def test_response_messages_not_starting_with_prompt(tmp_path):
    assert error_of(tmp_path, {**PAIR, "chosen": [{"role": "user", "content": "other"}, ASSISTANT]}) == (
        "row 2: field 'chosen': expected one assistant message (optionally after the prompt's messages), "
        "found 2 messages that do not start with the prompt")


def test_prompts_keep_other_columns_as_extra(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": [USER], "answer": "42", "tests": ["t1"]}])
    examples, _ = load_examples(path, "prompts")
    assert examples == [{"prompt": [USER], "extra": {"answer": "42", "tests": ["t1"]}, "_row": 1, "_source": path}]


def test_csv_missing_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,rejected\np,b\n")
    with pytest.raises(DataError) as info:
        load_examples(str(path), "pairs")
    assert str(info.value) == f"{path}: missing column 'chosen'; columns found: prompt, rejected"


def test_csv_demo_needs_completion_or_messages(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError) as info:
        load_examples(str(path), "demonstrations")
    assert str(info.value) == (f"{path}: missing columns 'prompt', 'completion' (or a 'messages' column); "
                               "columns found: question, answer")


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match=r"kind: expected one of demonstrations, pairs, prompts, found 'pair'"):
        load_examples(write_jsonl(tmp_path, [PAIR]), "pair")


def test_skip_invalid_counts_per_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(PAIR), json.dumps({**PAIR, "chosen": ""}), "{not json", json.dumps({**PAIR, "chosen": " "}),
             json.dumps({"prompt": "p"}), json.dumps({**PAIR, "rejected": "good"}), json.dumps({**PAIR, "prompt": "q"})]
    path.write_text("\n".join(lines) + "\n")
    examples, report = load_examples(str(path), "pairs", skip_invalid=True)
    assert [e["_row"] for e in examples] == [1, 7]
    assert report.rows_read == 7 and report.rows_kept == 2
    assert report.rows_skipped == {"empty response": 2, "invalid JSON": 1, "missing field": 1,
                                   "identical responses": 1}
    assert report.first_errors["empty response"].startswith(f"{path}: row 2: field 'chosen'")
    assert report.summary() == ("read 7 rows, kept 2; skipped 5 (empty response: 2, identical responses: 1, "
                                "invalid JSON: 1, missing field: 1)")


def test_without_skip_the_first_bad_row_raises(tmp_path):
    path = write_jsonl(tmp_path, [PAIR, {**PAIR, "chosen": ""}, {"prompt": "p"}])
    with pytest.raises(DataError, match=r"row 2: field 'chosen'"):
        load_examples(path, "pairs")
