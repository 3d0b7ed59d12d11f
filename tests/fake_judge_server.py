"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests.

`running_fake_judge()` starts a real `http.server.ThreadingHTTPServer` on a free port in a thread and
yields its `FakeJudge` state. Verdicts are deterministic: pairwise questions (distalign's template)
are answered by `mode` ("longer": the longer answer wins, equal lengths tie; "keyword": the answer
containing `keyword`; "always_a": position bias, always "[[A]]"); single-answer questions get
"Rating: [[n]]" with n = the answer's word count clipped to [1, 10]. Switches simulate trouble:
`slow_requests` first requests sleep `delay` seconds, `fail_statuses` is a queue of HTTP errors to
answer first (with `retry_after` if set), `malformed` first answers are broken JSON, `unparseable`
first answers have no verdict, `reject_status` answers every request with that status and a reason
that echoes the Authorization header (to check the client never repeats the key).
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ANSWER_A = re.compile(r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End of Assistant A's Answer\]", re.DOTALL)
_ANSWER_B = re.compile(r"\[The Start of Assistant B's Answer\]\n(.*?)\n\[The End of Assistant B's Answer\]", re.DOTALL)
_SINGLE = re.compile(r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.DOTALL)


@dataclass
class FakeJudge:
    """Behaviour switches (set by tests) and request statistics (read by tests)."""

    mode: str = "longer"
    keyword: str = "good"
    delay: float = 0.0
    slow_requests: int = 0
    fail_statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    malformed: int = 0
    unparseable: int = 0
    reject_status: int | None = None
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def verdict(self, user_text: str) -> str:
        """The deterministic judge answer text for one user message."""
        single = _SINGLE.search(user_text)
        if single:
            words = len(single.group(1).split())
            return f"The answer is fine. Rating: [[{min(10, max(1, words))}]]"
        answer_a, answer_b = _ANSWER_A.search(user_text).group(1), _ANSWER_B.search(user_text).group(1)
        if self.mode == "always_a":
            return "Assistant A is better. [[A]]"
        if self.mode == "keyword":
            a_has, b_has = self.keyword in answer_a, self.keyword in answer_b
            return "[[A]]" if a_has and not b_has else "[[B]]" if b_has and not a_has else "[[C]]"
        if len(answer_a) == len(answer_b):
            return "Both are equally long. [[C]]"
        return "Longer is better. " + ("[[A]]" if len(answer_a) > len(answer_b) else "[[B]]")


def _take(judge: FakeJudge, name: str) -> bool:
    """Decrement a countdown switch under the lock; True if it was still positive."""
    with judge.lock:
        if getattr(judge, name) > 0:
            setattr(judge, name, getattr(judge, name) - 1)
            return True
        return False


class _Handler(BaseHTTPRequestHandler):
    judge: FakeJudge  # set on the subclass made per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, reason: str | None = None, headers: dict | None = None):
        # No longer in flight once the answer goes out: the client may send its next request the moment
        # it has read this one, before this thread would get back to a `finally`.
        self._leave()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        judge = self.judge
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with judge.lock:
            judge.requests += 1
            judge.in_flight += 1
            judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
            judge.authorizations.append(self.headers.get("Authorization"))
            judge.bodies.append(json.loads(raw))
            status = judge.fail_statuses.pop(0) if judge.fail_statuses else None
        self._in_flight = True
        try:
            self._answer(judge, json.loads(raw), status)
        finally:
            self._leave()

    def _leave(self) -> None:
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            with self.judge.lock:
                self.judge.in_flight -= 1

    def _answer(self, judge: FakeJudge, body: dict, status: int | None) -> None:
        if _take(judge, "slow_requests"):
            time.sleep(judge.delay)
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        if judge.reject_status is not None:
            echo = f"rejected credentials {self.headers.get('Authorization')}"
            return self._send(judge.reject_status, json.dumps({"error": echo}).encode(), reason=echo)
        if status is not None:
            extra = {"Retry-After": judge.retry_after} if judge.retry_after is not None else {}
            return self._send(status, b'{"error": "try later"}', headers=extra)
        if _take(judge, "malformed"):
            return self._send(200, b'{"choices": [{"message": {"content": "[[A]')
        content = "I cannot decide." if _take(judge, "unparseable") else judge.verdict(body["messages"][-1]["content"])
        answer = {"id": "fake", "object": "chat.completion", "model": body.get("model"),
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": content}}]}
        self._send(200, json.dumps(answer).encode())


@contextlib.contextmanager
def running_fake_judge():
    """Start the fake on 127.0.0.1:<free port> in a daemon thread; shut it down on exit."""
    judge = FakeJudge()
    handler = type("FakeJudgeHandler", (_Handler,), {"judge": judge})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    judge.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield judge
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
