"""Reward sources: verifiers, 'module:function' callables, weighted sums, a reward model."""
from types import SimpleNamespace

import pytest
import torch

from distalign.rewards import (
    CallableSource,
    RewardModelSource,
    WeightedSum,
    build_reward,
    exact_answer,
    last_number,
    regex_reward,
)


def test_last_number_and_exact_answer():
    assert last_number("2 + 3 = 5, so 5.") == 5.0
    assert last_number("-12.5 then 1,000") == 1000.0
    assert last_number("none") is None
    completions = ["The answer is 19.", "19 or 20", "nineteen", "x = -3"]
    assert exact_answer([""] * 4, completions, answer=["19", 19, 19, "#### -3"]) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no 'answer' column"):
        exact_answer(["p"], ["1"])


def test_regex_reward():
    assert regex_reward(["p"] * 3, ["<a>7</a>", "a7", "<a>x</a>"], pattern=r"<a>\d+</a>") == [1.0, 0.0, 0.0]
    assert regex_reward(["p"] * 2, ["42", "42!"], pattern=r"\d+", full_match=True) == [1.0, 0.0]


def test_callable_source_by_name_passes_row_columns():
    source = CallableSource("distalign.rewards.verifiers:exact_answer")
    scores = source(["q1", "q2"], ["it is 4", "it is 5"], [{"answer": 4, "id": 1}, {"answer": 6, "id": 2}])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'module:function'"),
    ("distalign_missing_mod:fn", "cannot import module"),
    ("distalign.rewards.verifiers:nope", "has no callable 'nope'"),
])
def test_callable_source_bad_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        CallableSource(spec)


def test_callable_source_checks_values():
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        CallableSource(lambda p, c, **_: [1.0])(["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(ValueError, match="value 1 is nan"):
        CallableSource(lambda p, c, **_: [1.0, float("nan")])(["a", "b"], ["x", "y"], [{}, {}])


def test_weighted_sum_and_build_reward():
    specs = [SimpleNamespace(kind="exact_answer", path="", pattern="", weight=2.0, name="correct", kwargs={}),
             SimpleNamespace(kind="regex", path="", pattern=r"^\d+$", weight=0.5, name="", kwargs={})]
    reward = build_reward(specs)
    scores = reward(["p", "p"], ["7", "it is 7"], [{"answer": 7}, {"answer": 7}])
    assert scores.tolist() == [2.5, 2.0]
    assert reward.last_parts["correct"].tolist() == [1.0, 1.0] and "regex_1" in reward.last_parts
    with pytest.raises(ValueError, match=r"rewards\[0\].pattern: required"):
        build_reward([SimpleNamespace(kind="regex", path="", pattern="", weight=1.0, kwargs={})])
    with pytest.raises(ValueError, match=r"rewards\[0\].kind: unknown reward kind 'judge'"):
        build_reward([SimpleNamespace(kind="judge", path="", pattern="", weight=1.0, kwargs={})])
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])


def test_reward_model_source_scores_last_real_token(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from distalign.models import load_tokenizer, make_tiny_reward_model
    path = make_tiny_reward_model(tmp_path / "rm", hidden_size=32, vocab_size=300,
                                  corpus=["a short corpus", "numbers 1 2 3"] * 20)
    source = RewardModelSource.from_pretrained(str(path), batch_size=2)
    prompts, completions = ["Hello ", "A much longer prompt here ", "x"], ["world", "and answer", "y z"]
    scores = source(prompts, completions, [{}] * 3)
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = load_tokenizer(str(path))
    raw = RewardModelSource(model, tok, batch_size=2, chat_template="never")(prompts, completions, [{}] * 3)
    for i in range(3):  # one unpadded row at a time, formatted as reward training formats pairs
        # data.chat_template=auto and the tokenizer has a template: the prompt is one user turn
        turn = tok.apply_chat_template([{"role": "user", "content": prompts[i]}], tokenize=False,
                                       add_generation_prompt=True)
        response = tok(completions[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for got, prompt_ids in ((scores[i], tok(turn, add_special_tokens=False)["input_ids"]),
                                (raw[i], tok(prompts[i])["input_ids"])):
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([prompt_ids + response])).logits[0, 0].item()
            assert got.item() == pytest.approx(expected, abs=1e-5)


def test_callable_source_names_the_sample_that_raises_and_accepts_numpy():
    import numpy as np

    def picky(prompts, completions, **_):
        return [1.0 / (len(c) - 2) for c in completions]   # ZeroDivisionError on a 2-character completion

    with pytest.raises(ValueError, match=r"picky raised ZeroDivisionError: .* on sample 1 \(prompt 'p1'\)"):
        CallableSource(picky)(["p0", "p1", "p2"], ["abc", "ab", "abcd"], [{}, {}, {}])
    with pytest.raises(ValueError, match="returned NoneType None, expected a list of 2 numbers"):
        CallableSource(lambda p, c, **_: None)(["a", "b"], ["x", "y"], [{}, {}])
    scores = CallableSource(lambda p, c, **_: [np.float32(0.5), np.int64(2), True])(["a"] * 3, ["x"] * 3, [{}] * 3)
    assert scores.tolist() == [0.5, 2.0, 1.0]
    assert CallableSource(lambda p, c, **_: np.array([1.5, 2.5]))(["a"] * 2, ["x"] * 2, [{}] * 2).tolist() == [1.5, 2.5]


def test_a_syntax_error_in_a_plugin_names_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "syntax_bad_plugin.py").write_text("def f(p, c, **_):\n    return [1.0 for x in c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"syntax error in .*syntax_bad_plugin\.py, line 2"):
        CallableSource("syntax_bad_plugin:f")
