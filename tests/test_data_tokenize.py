"""Tokenisation: plain and chat rendering, separate prompt/response ids, limits and their counters.

The tokenizer is a word-level one built here (no download), so every expected id is written by hand:
specials <pad>=0 <unk>=1 <bos>=2 <eos>=3 <|user|>=4 <|assistant|>=5 <|system|>=6, then WORDS from 7.
"""
import json
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from distalign.data import (
    ChatFormat,
    DataError,
    TokenizedDemo,
    TokenizedPair,
    TokenizedPrompt,
    load_examples,
    tokenize_examples,
    tokenize_prompts,
)

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "hello", "world", "yes", "no"]
ID = {t: i for i, t in enumerate(SPECIALS + WORDS)}
BOS, EOS, USER, ASSISTANT, SYSTEM = 2, 3, 4, 5, 6
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(post_template="<bos> $A", chat_template=CHAT_TEMPLATE):
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=post_template,
                                                           special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIALS[4:])
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def raw():
    """No chat template: plain prompts go in as text (what data.chat_template=auto does for base models)."""
    return make_tokenizer(chat_template=None)


def ids(text):
    return [ID[w] for w in text.split()]


def example(row=1, source="d.jsonl", **fields):
    return {**fields, "_row": row, "_source": source}


def test_plain_pair(raw):
    records, report = tokenize_examples([example(prompt="the cat", chosen="sat on a mat", rejected="ran")],
                                        "pairs", raw, max_prompt_length=8, max_length=16)
    assert records == [TokenizedPair([BOS] + ids("the cat"), ids("sat on a mat") + [EOS], ids("ran") + [EOS])]
    assert report.summary() == "read 1 rows, kept 1"


def test_chat_pair_uses_template_without_a_second_bos(tokenizer):
    prompt = [{"role": "system", "content": "yes"}, {"role": "user", "content": "hello world"}]
    records, _ = tokenize_examples([example(prompt=prompt, chosen="hello", rejected="no")], "pairs", tokenizer,
                                   max_prompt_length=16, max_length=32)
    # rendered: "<|system|>yes\n<|user|>hello world\n<|assistant|>", tokenised with add_special_tokens=False
    assert records[0].prompt_ids == [SYSTEM, ID["yes"], USER] + ids("hello world") + [ASSISTANT]
    assert (records[0].chosen_ids, records[0].rejected_ids) == ([ID["hello"], EOS], [ID["no"], EOS])


def test_demonstration_from_messages_file(tmp_path, tokenizer):
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "the dog"},
                                             {"role": "assistant", "content": "ran"}]}) + "\n")
    examples, _ = load_examples(str(path), "demonstrations")
    records, _ = tokenize_examples(examples, "demonstrations", tokenizer, max_prompt_length=8, max_length=16)
    assert records == [TokenizedDemo([USER] + ids("the dog") + [ASSISTANT], [ID["ran"], EOS])]


def test_prompts_keep_original_prompt_and_extra(tokenizer):
    chat = [{"role": "user", "content": "yes"}]
    examples = [example(prompt="a dog", extra={"answer": "42"}), example(row=2, prompt=chat, extra={})]
    records, _ = tokenize_examples(examples, "prompts", tokenizer, max_prompt_length=8, max_length=16)
    # data.chat_template=auto and the tokenizer has a template: the plain prompt is one user turn
    assert records == [TokenizedPrompt([USER] + ids("a dog") + [ASSISTANT], "a dog", {"answer": "42"}),
                       TokenizedPrompt([USER, ID["yes"], ASSISTANT], chat, {})]


def test_prompt_over_limit_names_file_row_field(raw):
    examples = [example(prompt="the cat", chosen="a", rejected="no"),
                example(row=5, prompt="the cat sat on a mat", chosen="a", rejected="no")]
    with pytest.raises(DataError) as info:
        tokenize_examples(examples, "pairs", raw, max_prompt_length=6, max_length=10)
    # "<bos> the cat sat on a mat" is 7 tokens, the BOS counts
    assert str(info.value) == ("d.jsonl: row 5: field 'prompt': expected at most 6 tokens (max_prompt_length), "
                               "found 7")


def test_prompt_over_limit_skipped_and_counted(raw):
    examples = [example(prompt="the cat", chosen="a", rejected="no"),
                example(row=2, prompt="the cat sat on a mat", chosen="a", rejected="no")]
    records, report = tokenize_examples(examples, "pairs", raw, max_prompt_length=6, max_length=10,
                                        skip_invalid=True)
    assert len(records) == 1 and records[0].prompt_ids == [BOS] + ids("the cat")
    assert report.rows_skipped == {"prompt too long": 1}
    assert report.summary() == "read 2 rows, kept 1; skipped 1 (prompt too long: 1)"


def test_long_responses_truncated_from_the_end_and_counted(raw):
    examples = [example(prompt="the", chosen="cat sat on a mat", rejected="dog"),
                example(row=2, prompt="the", chosen="cat", rejected="dog ran on a")]
    records, report = tokenize_examples(examples, "pairs", raw, max_prompt_length=4, max_length=5)
    # budget = 5 - len([<bos>, the]) = 3 tokens per response; a cut response loses its EOS
    assert records[0] == TokenizedPair([BOS, ID["the"]], ids("cat sat on"), [ID["dog"], EOS])
    assert records[1] == TokenizedPair([BOS, ID["the"]], [ID["cat"], EOS], ids("dog ran on"))
    assert report.truncated == {"chosen": 1, "rejected": 1}
    assert report.summary() == "read 2 rows, kept 2; truncated chosen: 1, rejected: 1"


def test_response_exactly_at_the_limit_is_not_counted(raw):
    records, report = tokenize_examples([example(prompt="the", completion="cat sat")], "demonstrations",
                                        raw, max_prompt_length=4, max_length=5)
    assert records[0].completion_ids == ids("cat sat") + [EOS] and report.truncated == {}


def test_eos_appended_by_tokenizer_is_dropped_from_prompts():
    tokenizer = make_tokenizer(post_template="<bos> $A <eos>", chat_template=None)
    assert tokenize_prompts(["the cat"], tokenizer) == [[BOS] + ids("the cat")]


def test_tokenizer_without_bos_adds_none():
    tokenizer = make_tokenizer(post_template="$A", chat_template=None)
    records, _ = tokenize_examples([example(prompt="the cat", completion="ran")], "demonstrations", tokenizer,
                                   max_prompt_length=4, max_length=8)
    assert records[0] == TokenizedDemo(ids("the cat"), [ID["ran"], EOS])


def test_chat_rows_need_a_chat_template():
    tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(DataError) as info:
        tokenize_examples([example(row=3, prompt=[{"role": "user", "content": "yes"}], completion="no")],
                          "demonstrations", tokenizer, max_prompt_length=8, max_length=16)
    assert str(info.value).startswith("d.jsonl: row 3: field 'prompt': expected a plain string because the "
                                      "tokenizer has no chat_template, found chat messages")


@pytest.mark.parametrize("max_prompt_length,max_length", [(0, 8), (8, 8), (8, 4)])
def test_inconsistent_limits(tokenizer, max_prompt_length, max_length):
    with pytest.raises(ValueError, match=r"^max_length: must exceed max_prompt_length"):
        tokenize_examples([], "pairs", tokenizer, max_prompt_length=max_prompt_length, max_length=max_length)


def test_source_name_overrides_row_source(tokenizer):
    with pytest.raises(DataError, match=r"^train\.csv: row 1: field 'prompt'"):
        tokenize_examples([example(prompt="the cat sat on a mat", completion="a")], "demonstrations", tokenizer,
                          max_prompt_length=2, max_length=8, source_name="train.csv")


def test_end_to_end_from_csv(tmp_path, raw):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,note\nthe cat,sat,ran,x\n,a,no,y\nthe dog,hello world yes,no,z\n")
    examples, load_report = load_examples(str(path), "pairs", skip_invalid=True)
    records, tok_report = tokenize_examples(examples, "pairs", raw, max_prompt_length=3, max_length=5,
                                            skip_invalid=True)
    assert load_report.rows_skipped == {"empty prompt": 1}
    assert records == [TokenizedPair([BOS] + ids("the cat"), [ID["sat"], EOS], [ID["ran"], EOS]),
                       TokenizedPair([BOS] + ids("the dog"), ids("hello world"), [ID["no"], EOS])]
    assert tok_report.truncated == {"chosen": 1}


def test_cache_reuses_entry_and_misses_on_any_change(tmp_path, raw, monkeypatch):
    from distalign.data import cache

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "the", "extra_col": 1}) + "\n")
    kwargs = {"cache_dir": str(tmp_path / "cache"), "max_prompt_length": 4, "max_length": 8}
    first = cache.load_tokenized(str(path), "prompts", raw, **kwargs)
    assert first[0] == [TokenizedPrompt([BOS, ID["the"]], "the", {"extra_col": 1})]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    calls = []
    real = cache.tokenize_examples
    monkeypatch.setattr(cache, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cache.load_tokenized(str(path), "prompts", raw, **kwargs) == first and calls == []
    cache.load_tokenized(str(path), "prompts", raw, **{**kwargs, "max_prompt_length": 3})
    assert calls == [1]  # new limits: a miss
    path.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    records, _, _ = cache.load_tokenized(str(path), "prompts", raw, **kwargs)
    assert records[0].prompt_ids == [BOS] + ids("the cat") and calls == [1, 1]  # new bytes: a miss
    cache.load_tokenized(str(path), "prompts", make_tokenizer(post_template="$A"), **kwargs)
    assert calls == [1, 1, 1]  # another tokenizer: a miss
    cache.load_tokenized(str(path), "prompts", raw, **kwargs, chat=ChatFormat("never"))
    assert calls == [1, 1, 1, 1]  # another chat format (same ids here, but not in general): a miss


def test_exact_response_ids_are_used_verbatim_without_eos(tmp_path, tokenizer):
    """A sampled response cut at the length limit has no EOS; given as ids it stays cut (the text alone
    would get an EOS appended), and ids win over a text that tokenises differently."""
    rows = [{"prompt": "hello", "chosen": "the cat", "rejected": "a dog", "chosen_ids": ids("the cat sat"),
             "rejected_ids": ids("a dog") + [EOS]},
            {"prompt": "hello", "chosen": "yes", "rejected": "no"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_examples(str(path), "pairs")
    records, _ = tokenize_examples(examples, "pairs", tokenizer, max_prompt_length=8, max_length=32)
    assert records[0].chosen_ids == ids("the cat sat") and records[0].rejected_ids == ids("a dog") + [EOS]
    assert records[1].chosen_ids == ids("yes") + [EOS]


def test_exact_completion_ids_are_truncated_and_counted_like_text(tokenizer):
    rows = [example(prompt="hello", completion="the cat sat", completion_ids=ids("the cat sat on a mat"))]
    records, report = tokenize_examples(rows, "demonstrations", tokenizer,
                                        max_prompt_length=4, max_length=6)
    budget = 6 - len(records[0].prompt_ids)                       # what max_length leaves after the prompt
    assert records[0].completion_ids == ids("the cat sat on a mat")[:budget] and report.truncated == {"completion": 1}


@pytest.mark.parametrize("value, message", [
    ([], "field 'chosen_ids': expected a non-empty list of token ids, found a list (empty)"),
    ("1 2", "field 'chosen_ids': expected a non-empty list of token ids, found a string"),
    ([7, -1], "field 'chosen_ids[1]': expected a non-negative integer token id, found an integer -1"),
    ([7, 2.0], "field 'chosen_ids[1]': expected a non-negative integer token id, found a number 2.0"),
    ([7, 99], "field 'chosen_ids': expected token ids below the vocabulary size 19, found 99"),
])
def test_bad_response_ids_name_file_row_and_field(tmp_path, tokenizer, value, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "chosen": "yes", "rejected": "no", "chosen_ids": value}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"pairs.jsonl: row 1: {message}")):
        examples, _ = load_examples(str(path), "pairs")
        tokenize_examples(examples, "pairs", tokenizer, max_prompt_length=8, max_length=32)
