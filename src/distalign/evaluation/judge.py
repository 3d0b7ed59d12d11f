"""An LLM judge behind an OpenAI-compatible chat-completions endpoint (`POST {base_url}/chat/completions`).

Standard library only (urllib + a thread pool). What it guarantees:
- the API key is read from the environment variable *named* by `api_key_env` at call time, sent as
  `Authorization: Bearer ...`, and never logged, cached or put into an exception message;
- transport failures (429, 5xx, connection errors, timeouts) are retried with exponential backoff and
  jitter, honouring `Retry-After`; other 4xx fail at once (a retry cannot fix a bad request);
- an answer that is not valid chat-completions JSON, or whose verdict cannot be parsed, is re-asked
  `invalid_retries` times and then reported as invalid (None) instead of crashing the evaluation;
- at most `max_concurrency` requests are in flight;
- parsed verdicts go to a JSONL cache keyed by a hash of (model, exact messages), so an interrupted
  evaluation resumes without asking again. Invalid answers are not cached: re-running re-asks them.

The pairwise prompt follows MT-Bench's pairwise judge (Zheng et al. 2023, "Judging LLM-as-a-judge"):
the verdict is "[[A]]", "[[B]]" or "[[C]]" (tie).
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from distalign.config import build_dataclass, schema_field as _f
from distalign.config.loader import Location
from distalign.config.schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE

from .judge_cache import VerdictCache, cache_key

PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Choose the assistant that follows the user's "
    "instructions and answers the question better. Avoid any position bias: the order in which the "
    "responses are presented must not influence your decision, and neither must their length. Be as "
    "objective as possible. After a short explanation, output your final verdict by strictly following "
    'this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{prompt}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)
_BRACKETED = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)
_RETRY_STATUS = 429


class JudgeError(RuntimeError):
    """The judge endpoint could not be used (bad config, non-retryable HTTP error, retries exhausted)."""


class MalformedAnswer(ValueError):
    """The endpoint answered 200 with a body that is not chat-completions JSON."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge. Built from a config mapping by `JudgeConfig.from_dict` (or as the
    `judge:` section of the eval config), with every value checked against its range."""

    base_url: str = _f("", "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (required)")
    model: str = _f("", "the judge model name sent in the request (required)")
    api_key_env: str | None = _f("OPENAI_API_KEY", "NAME of the environment variable holding the API key "
                                                   "(never the key itself); null: no key sent")
    timeout: float = _f(60.0, "seconds per HTTP request", range=POSITIVE)
    max_retries: int = _f(5, "transport retries after the first try (429 / 5xx / timeouts)", range=NON_NEGATIVE)
    backoff: float = _f(1.0, "base delay (s); try k waits about backoff * 2**k, with jitter", range=NON_NEGATIVE)
    max_backoff: float = _f(60.0, "cap on one wait (s), Retry-After included", range=NON_NEGATIVE)
    max_concurrency: int = _f(4, "requests in flight at most", range=AT_LEAST_ONE)
    invalid_retries: int = _f(1, "re-asks when the answer is malformed or has no verdict", range=NON_NEGATIVE)
    temperature: float = _f(0.0, "judge sampling temperature", range=NON_NEGATIVE)
    max_tokens: int = _f(512, "longest judge answer (tokens)", range=AT_LEAST_ONE)
    cache_path: str | None = _f(None, "JSONL verdict cache; null disables caching (eval: <output_dir>/judge_cache.jsonl)")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "judge config") -> JudgeConfig:
        """Validate a mapping; errors name the key as `judge.{key}` (and `where` the value came from)."""
        return build_dataclass(cls, dict(raw), Location(where, path="judge"))

    def validate(self):
        for key in ("base_url", "model"):
            if not getattr(self, key):
                raise ValueError(key, "required, a non-empty string")
        if self.api_key_env is not None and not looks_like_env_name(self.api_key_env):
            # The value is probably the key itself: say so without echoing it.
            raise ValueError("api_key_env", "expected the NAME of an environment variable (such as "
                                            "OPENAI_API_KEY), got something that looks like an API key "
                                            "(not shown); export it and give the variable's name")

    def check_key(self) -> None:
        """Fail now (before any model loads) when the named environment variable is unset."""
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise JudgeError(f"judge.api_key_env: environment variable {self.api_key_env!r} is not set")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def looks_like_env_name(text: str) -> bool:
    """An environment variable name (letters, digits, underscores), not a pasted secret: keys carry
    dashes or dots (sk-..., hf_...-...), or are long runs of mixed-case letters and digits."""
    if not _ENV_NAME.fullmatch(text):
        return False
    mixed = any(c.islower() for c in text) and any(c.isdigit() for c in text)
    return not (len(text) >= 20 and mixed)


def parse_pairwise_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge answer; None when no verdict can be read.

    Accepts "[[A]]" / "[[B]]" / "[[C]]" / "[[tie]]" (the last one wins, since judges often restate the
    format before concluding) or a bare answer such as "A" or "Tie.".
    """
    matches = _BRACKETED.findall(text)
    if not matches:
        matches = _BARE.findall(text.strip())
    if not matches:
        return None
    verdict = matches[-1].upper()
    return {"A": "A", "B": "B"}.get(verdict, "tie")


def pairwise_messages(prompt: str, answer_a: str, answer_b: str) -> list[dict]:
    """The chat messages asking which of two answers to `prompt` is better."""
    user = PAIRWISE_USER.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def _retry_after_seconds(headers) -> float | None:
    """Retry-After in seconds (only the delta-seconds form; an HTTP date falls back to backoff)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _scrub(text: str, key: str | None) -> str:
    """`text` with the API key masked, in case a server echoes request headers into its error text."""
    return text.replace(key, "***") if key else text


def _content_of(body: bytes) -> str:
    """choices[0].message.content of a chat-completions response, or MalformedAnswer."""
    try:
        content = json.loads(body.decode("utf-8"))["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        raise MalformedAnswer(f"not a chat-completions answer ({type(error).__name__})") from None
    if not isinstance(content, str):
        raise MalformedAnswer("choices[0].message.content is not a string")
    return content


class JudgeClient:
    """Asks the judge, with retries, a concurrency limit and a verdict cache (see the module doc)."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep, seed: int = 0):
        self.config = config
        self.cache = VerdictCache(config.cache_path) if config.cache_path else None
        self.requests_sent = 0          # HTTP attempts, retries included; for reports and tests
        self._sleep = sleep
        self._jitter = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def _api_key(self) -> str | None:
        if not self.config.api_key_env:
            return None
        self.config.check_key()
        return os.environ[self.config.api_key_env]

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        # Full-range jitter on [0.5, 1] x the exponential step spreads retries of concurrent workers apart.
        step = self.config.backoff * (2 ** attempt) * (0.5 + 0.5 * self._jitter.random())
        delay = retry_after if retry_after is not None else step
        self._sleep(min(delay, self.config.max_backoff))

    def _post_once(self, payload: bytes, key: str | None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        with self._lock:
            self.requests_sent += 1
        with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
            return response.read()

    def complete(self, messages: list[dict]) -> str:
        """The judge's answer text. Retries transport failures; raises JudgeError or MalformedAnswer."""
        key = self._api_key()
        payload = json.dumps({"model": self.config.model, "messages": messages,
                              "temperature": self.config.temperature,
                              "max_tokens": self.config.max_tokens}).encode("utf-8")
        last_problem = "no attempt made"
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                return _content_of(self._post_once(payload, key))
            except urllib.error.HTTPError as error:
                error.close()
                if error.code != _RETRY_STATUS and error.code < 500:
                    problem = _scrub(f"HTTP {error.code} {error.reason}", key)
                    raise JudgeError(f"judge {self.url}: {problem} (not retried)") from None
                retry_after = _retry_after_seconds(error.headers)
                last_problem = f"HTTP {error.code} {error.reason}"
            except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets
                last_problem = f"{type(error).__name__}: {getattr(error, 'reason', None) or error}"
            if attempt < self.config.max_retries:
                self._wait(attempt, retry_after)
        raise JudgeError(f"judge {self.url}: gave up after {self.config.max_retries + 1} tries; "
                         f"last: {_scrub(last_problem, key)}") from None

    def ask(self, messages: list[dict], parse: Callable[[str], object | None], kind: str) -> object | None:
        """The parsed answer to `messages`, from the cache when present; None if it stays unparseable."""
        key = cache_key(self.config.model, kind, messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        for _ in range(self.config.invalid_retries + 1):
            try:
                parsed = parse(self.complete(messages))
            except MalformedAnswer:
                parsed = None
            if parsed is not None:
                if self.cache is not None:
                    self.cache.put(key, parsed)
                return parsed
        return None

    def map(self, fn: Callable, items: Sequence) -> list:
        """[fn(item) for item in items] on `max_concurrency` threads, in order; the first error propagates
        (verdicts finished before it are already in the cache)."""
        with ThreadPoolExecutor(max_workers=int(self.config.max_concurrency)) as pool:
            return list(pool.map(fn, items))

    def pairwise_verdicts(self, jobs: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """For each (prompt, answer_a, answer_b): 'A', 'B', 'tie' or None (invalid)."""
        return self.map(lambda job: self.ask(pairwise_messages(*job), parse_pairwise_verdict, "pairwise"), jobs)


def combine_orders(first: str | None, swapped: str | None) -> str:
    """One pair's outcome for *ours* from both orders: ours as A in `first`, ours as B in `swapped`.

    win: both orders prefer ours; loss: both prefer theirs; invalid: either order unreadable;
    tie otherwise (an explicit tie, or the orders disagree, i.e. the judge followed the position).
    """
    if first is None or swapped is None:
        return "invalid"
    ours_first = {"A": "ours", "B": "theirs"}.get(first, "tie")
    ours_swapped = {"B": "ours", "A": "theirs"}.get(swapped, "tie")
    if ours_first == ours_swapped == "ours":
        return "win"
    if ours_first == ours_swapped == "theirs":
        return "loss"
    return "tie"


def judge_pairs(client: JudgeClient, prompts: Sequence[str], ours: Sequence[str],
                theirs: Sequence[str]) -> list[str]:
    """'win' / 'loss' / 'tie' / 'invalid' per prompt, each pair asked in both orders."""
    if not len(prompts) == len(ours) == len(theirs):
        raise ValueError(f"judge_pairs: lengths differ: {len(prompts)} prompts, {len(ours)} ours, "
                         f"{len(theirs)} theirs")
    jobs = [(p, a, b) for p, a, b in zip(prompts, ours, theirs)]
    jobs += [(p, b, a) for p, a, b in zip(prompts, ours, theirs)]
    verdicts = client.pairwise_verdicts(jobs)
    n = len(prompts)
    return [combine_orders(verdicts[i], verdicts[n + i]) for i in range(n)]
