"""Run the sides of a benchmark in lockstep: one process per side, their steps taking turns.

Why: this machine's speed drifts by ±20% over minutes (PERFORMANCE.md). Running one side's whole
run after the other's lets that drift land on one side only; taking turns step by step spreads it over
both, so the ratio of their medians holds still from run to run. Only one side computes at a time: the
others block on their stdin, so each side still has both cores and its own peak RSS.

Parent:  results = run_lockstep({"trl": cmd, "distalign": cmd2}, steps=12, env=env)
         results["trl"]["steps"] is the list of per-step reports, results["trl"]["result"] the final one.
Worker:  ready(); then per step: wait_turn(); ... one timed step ...; report("step", {...});
         finally report("result", {...}).
Workers start one at a time, each set up (and any timed precompute done) before the next starts.
Lines on the worker's stdout that do not start with the protocol tag are ignored (library logs).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

TAG = "@@lockstep "


def report(kind: str, payload: dict) -> None:
    """Worker: send one message to the parent."""
    sys.stdout.write(f"{TAG}{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def ready() -> None:
    report("ready", {})


def wait_turn() -> None:
    """Worker: block until the parent says it is this side's turn to run one step."""
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"lockstep: expected 'go' from the parent, got {line!r}")


class Side:
    """The parent's handle on one worker process."""

    def __init__(self, name: str, cmd: list[str], env: dict):
        self.name, self.steps = name, []
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 -- open for the worker's lifetime
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, bufsize=1)

    def expect(self, kind: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                got, payload = line[len(TAG):].split(" ", 1)
                if got != kind:
                    raise RuntimeError(f"{self.name}: expected '{kind}' from the worker, got '{got}'")
                return json.loads(payload)
        self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"{self.name} worker exited ({self.proc.returncode}) before '{kind}':\n"
                           f"{self.stderr.read()[-3000:]}")

    def step(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.steps.append(self.expect("step"))

    def finish(self) -> dict:
        result = self.expect("result")
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()
        return {"steps": self.steps, "result": result}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_lockstep(commands: dict[str, list[str]], steps: int, env: dict, progress=None) -> dict[str, dict]:
    """Start every side (one at a time, each until it is ready), then run `steps` rounds in which each
    side does one step; the side that goes first rotates. Returns {side: {"steps": [...], "result": {...}}}."""
    sides: list[Side] = []
    try:
        for name, cmd in commands.items():
            sides.append(Side(name, cmd, env))
            sides[-1].expect("ready")
        for i in range(steps):
            shift = i % len(sides)
            for side in sides[shift:] + sides[:shift]:
                side.step()
            if progress:
                progress(i + 1)
        return {side.name: side.finish() for side in sides}
    finally:
        for side in sides:
            side.kill()
