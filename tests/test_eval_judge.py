"""The LLM judge client against a real HTTP server on 127.0.0.1 (tests/fake_judge_server.py)."""
from __future__ import annotations

import json
import time

import pytest
from fake_judge_server import running_fake_judge

from distalign.evaluation import (
    JudgeClient,
    JudgeConfig,
    JudgeError,
    combine_orders,
    grade_single,
    judge_pairs,
    judge_winrate,
    parse_pairwise_verdict,
    parse_rating,
)

KEY_ENV, KEY = "DISTALIGN_TEST_JUDGE_KEY", "sk-test-0123456789abcdef"


@pytest.fixture
def server():
    with running_fake_judge() as judge:
        yield judge


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def make_client(server, recorded_sleeps=None, **overrides) -> JudgeClient:
    settings = {"base_url": server.base_url, "model": "fake-judge", "api_key_env": KEY_ENV, "timeout": 5.0,
                "max_retries": 3, "backoff": 0.01, "max_backoff": 2.0, "max_concurrency": 2, "invalid_retries": 1}
    settings.update(overrides)
    sleep = recorded_sleeps.append if recorded_sleeps is not None else time.sleep
    return JudgeClient(JudgeConfig.from_dict(settings), sleep=sleep)


PROMPTS = ["q1", "q2", "q3"]
LONG = ["a much longer answer", "another long answer here", "same"]
SHORT = ["short", "tiny", "same"]


# ---- parsing and combining, no server -------------------------------------------------------------
@pytest.mark.parametrize("text, verdict", [
    ("A is better. [[A]]", "A"), ("[[B]]", "B"), ("It's a tie [[C]]", "tie"), ("[[tie]]", "tie"),
    ('Format: "[[A]]" if A is better... final: [[B]]', "B"), ("B", "B"), (" Tie. ", "tie"),
    ("I cannot decide.", None), ("", None), ("[[D]]", None)])
def test_parse_pairwise_verdict(text, verdict):
    assert parse_pairwise_verdict(text) == verdict


@pytest.mark.parametrize("first, swapped, outcome", [
    ("A", "B", "win"), ("B", "A", "loss"), ("A", "A", "tie"), ("B", "B", "tie"), ("tie", "B", "tie"),
    ("tie", "tie", "tie"), (None, "B", "invalid"), ("A", None, "invalid")])
def test_combine_orders(first, swapped, outcome):
    assert combine_orders(first, swapped) == outcome


@pytest.mark.parametrize("text, score", [
    ("Good. Rating: [[7]]", 7.0), ('Use "[[5]]". Rating: [[8.5]]', 8.5), ("Rating: 6", 6.0),
    ("Rating: [[11]]", None), ("[[0]]", None), ("no score", None)])
def test_parse_rating(text, score):
    assert parse_rating(text) == score


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"judge\.base_url"):
        JudgeConfig.from_dict({"model": "m"})
    with pytest.raises(ValueError, match=r"judge\.max_concurrency"):
        JudgeConfig.from_dict({"base_url": "http://x", "model": "m", "max_concurrency": 0})
    with pytest.raises(ValueError, match=r"unknown key 'judge\.temprature'"):
        JudgeConfig.from_dict({"base_url": "http://x", "model": "m", "temprature": 0.0})


@pytest.mark.parametrize("value", ["sk-proj-AbC123xyz987", "hf_abcdefGHIJ1234567890klmn", "my key"])
def test_a_key_pasted_into_api_key_env_is_refused_and_not_echoed(value):
    with pytest.raises(ValueError, match="field 'judge.api_key_env': expected the NAME") as caught:
        JudgeConfig.from_dict({"base_url": "http://x", "model": "m", "api_key_env": value})
    assert value not in str(caught.value)


def test_env_var_names_are_accepted():
    for name in ("OPENAI_API_KEY", "MY_JUDGE_KEY_2", "together_api_key"):
        assert JudgeConfig.from_dict({"base_url": "http://x", "model": "m", "api_key_env": name}).api_key_env == name


# ---- against the server -----------------------------------------------------------------------------
def test_both_orders_are_asked_and_longer_wins(server):
    outcomes = judge_pairs(make_client(server), PROMPTS, LONG, SHORT)
    assert outcomes == ["win", "win", "tie"]
    assert server.requests == 2 * len(PROMPTS)
    users = [body["messages"][-1]["content"] for body in server.bodies]
    for long, short in zip(LONG[:2], SHORT[:2]):
        assert sum(f"A's Answer]\n{long}\n" in u and f"B's Answer]\n{short}\n" in u for u in users) == 1
        assert sum(f"A's Answer]\n{short}\n" in u and f"B's Answer]\n{long}\n" in u for u in users) == 1
    assert judge_pairs(make_client(server), PROMPTS, SHORT, LONG) == ["loss", "loss", "tie"]


def test_position_bias_cancels_to_ties(server):
    server.mode = "always_a"
    result = judge_winrate(PROMPTS, LONG, SHORT, make_client(server))
    assert (result.wins, result.ties, result.losses, result.rate) == (0, 3, 0, 0.5)


def test_keyword_judge_winrate_counts(server):
    server.mode = "keyword"
    ours, theirs = ["good one", "bad", "good", "meh"], ["bad", "good", "good", "meh"]
    result = judge_winrate(["p"] * 4, ours, theirs, make_client(server))
    # win, loss, tie, tie -> scores 1, 0, .5, .5: mean .5, sample var 1/6, stderr sqrt(1/24)
    assert (result.wins, result.losses, result.ties, result.invalid) == (1, 1, 2, 0)
    assert result.rate == pytest.approx(0.5) and result.stderr == pytest.approx((1 / 24) ** 0.5)


def test_retries_after_429_and_5xx_with_backoff(server):
    server.fail_statuses = [429, 500, 503]
    sleeps: list[float] = []
    client = make_client(server, recorded_sleeps=sleeps, backoff=0.1, max_concurrency=1)
    assert judge_pairs(client, ["q"], ["longer answer"], ["short"]) != ["invalid"]
    assert server.requests == 2 + 3
    # waits for tries 0, 1, 2: backoff * 2**k scaled by jitter in [0.5, 1]
    for k, wait in enumerate(sleeps):
        assert 0.05 * 2 ** k <= wait <= 0.1 * 2 ** k
    assert len(sleeps) == 3


def test_retry_after_is_honoured(server):
    server.fail_statuses, server.retry_after = [429], "1.5"
    sleeps: list[float] = []
    client = make_client(server, recorded_sleeps=sleeps, max_concurrency=1)
    assert client.pairwise_verdicts([("q", "long answer", "s")]) == ["A"]
    assert sleeps == [1.5]


def test_gives_up_after_max_retries(server):
    server.fail_statuses = [500] * 10
    client = make_client(server, recorded_sleeps=[], max_retries=2)
    with pytest.raises(JudgeError, match="gave up after 3 tries; last: HTTP 500"):
        client.pairwise_verdicts([("q", "a", "b")])
    assert server.requests == 3


def test_client_error_is_not_retried_and_key_not_echoed(server):
    server.reject_status = 401
    client = make_client(server, recorded_sleeps=[])
    with pytest.raises(JudgeError) as raised:
        client.pairwise_verdicts([("q", "a", "b")])
    assert server.requests == 1 and "HTTP 401" in str(raised.value)
    assert KEY not in str(raised.value) and KEY not in repr(raised.value.__cause__)


def test_timeout_then_success(server):
    server.delay, server.slow_requests = 2.0, 1
    client = make_client(server, timeout=0.3, max_concurrency=1)
    started = time.monotonic()
    assert client.pairwise_verdicts([("q", "long answer", "s")]) == ["A"]
    assert server.requests == 2 and time.monotonic() - started < 1.5  # did not wait for the slow answer


def test_timeout_exhausted_raises(server):
    server.delay, server.slow_requests = 0.6, 10
    client = make_client(server, timeout=0.2, max_retries=1, max_concurrency=1)
    with pytest.raises(JudgeError, match="gave up after 2 tries; last: .*timed out"):
        client.pairwise_verdicts([("q", "a", "b")])


def test_malformed_json_is_retried_then_counted_invalid(server):
    server.malformed = 1
    client = make_client(server, max_concurrency=1)
    assert client.pairwise_verdicts([("q", "long answer", "s")]) == ["A"]
    assert server.requests == 2
    server.malformed = 100
    result = judge_winrate(["q"], ["long answer"], ["s"], make_client(server, max_concurrency=1))
    assert (result.invalid, result.n) == (1, 0)


def test_unparseable_verdict_counts_invalid_and_is_not_cached(server, tmp_path):
    server.unparseable = 100
    cache = tmp_path / "verdicts.jsonl"
    client = make_client(server, invalid_retries=2, cache_path=str(cache))
    assert client.pairwise_verdicts([("q", "a", "b")]) == [None]
    assert server.requests == 3 and not cache.exists()


def test_concurrency_limit_is_respected(server):
    server.delay, server.slow_requests = 0.15, 1000
    client = make_client(server, max_concurrency=3)
    judge_pairs(client, [f"q{i}" for i in range(6)], ["long answer"] * 6, ["s"] * 6)
    assert server.requests == 12 and server.max_in_flight == 3


def test_cache_resumes_without_asking_again(server, tmp_path):
    cache = tmp_path / "cache" / "verdicts.jsonl"
    prompts = [f"q{i}" for i in range(4)]
    ours, theirs = ["a longer answer"] * 4, ["short"] * 4
    # an "interrupted" first run got through half of the prompts
    assert judge_pairs(make_client(server, cache_path=str(cache)), prompts[:2], ours[:2], theirs[:2]) == ["win"] * 2
    assert server.requests == 4
    with open(cache, "a", encoding="utf-8") as handle:   # a line torn by the kill
        handle.write('{"key": "abc", "val')
    resumed = make_client(server, cache_path=str(cache))
    assert resumed.cache.skipped_lines == 1
    assert judge_pairs(resumed, prompts, ours, theirs) == ["win"] * 4
    assert server.requests == 4 + 4
    again = make_client(server, cache_path=str(cache))
    assert judge_pairs(again, prompts, ours, theirs) == ["win"] * 4
    assert server.requests == 8 and again.requests_sent == 0
    lines = cache.read_text().splitlines()
    assert sum(1 for line in lines if line.startswith('{"key"') and line.endswith("}")) == 8


def test_api_key_sent_as_bearer_but_never_stored(server, tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    judge_pairs(make_client(server, cache_path=str(cache)), PROMPTS[:2], LONG[:2], SHORT[:2])
    assert server.authorizations == [f"Bearer {KEY}"] * 4
    assert KEY not in cache.read_text() and KEY_ENV not in cache.read_text()
    assert all(json.loads(line)["value"] in ("A", "B", "tie") for line in cache.read_text().splitlines())


def test_missing_key_env_names_the_variable_and_sends_nothing(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"judge.api_key_env: environment variable '{KEY_ENV}' is not set"):
        make_client(server).pairwise_verdicts([("q", "a", "b")])
    assert server.requests == 0


def test_no_key_configured_sends_no_authorization(server):
    make_client(server, api_key_env=None).pairwise_verdicts([("q", "a", "b")])
    assert server.authorizations == [None]


def test_mtbench_single_answer_grading(server, tmp_path):
    answers = ["one", "one two three four five six seven", " ".join(["w"] * 30)]
    client = make_client(server, cache_path=str(tmp_path / "grades.jsonl"))
    grades = grade_single(client, ["q1", "q2", "q3"], answers)
    assert grades.scores == [1.0, 7.0, 10.0]
    summary = grades.summary()
    # mean 6, sample variance ((-5)^2 + 1^2 + 4^2) / 2 = 21, stderr sqrt(21 / 3)
    assert summary["mean"] == pytest.approx(6.0) and summary["stderr"] == pytest.approx(7 ** 0.5)
    assert (summary["n"], summary["invalid"]) == (3, 0)
    assert grade_single(make_client(server, cache_path=str(tmp_path / "grades.jsonl")),
                        ["q1", "q2", "q3"], answers).scores == [1.0, 7.0, 10.0]
    assert server.requests == 3
