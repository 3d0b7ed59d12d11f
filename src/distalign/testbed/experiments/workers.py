"""Tasks of one experiment spread over worker processes that pull them from a shared queue.

    run_tasks(worker_main, (out, fields), tasks, workers=2, on_done=lambda task: ...)

Why processes: on a CPU two one-thread processes train about twice as fast as one two-thread process
(small matmuls do not scale over threads; measured on SmolLM2 LoRA runs, README real-lm). Each worker
is a fresh `spawn` process running `worker_main(*args, threads, todo, done)`: it builds what it needs
once, then takes tasks from `todo` until it reads None and answers each with (task, None) or
(task, "the one-line error"). Tasks are taken in the order given, so list the long ones first.
Whatever a task saves stays saved when another fails or a worker dies: the caller's caches make a
rerun continue.
"""
from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable

import torch


def threads_per_worker(workers: int) -> int:
    """This process's intra-op threads shared out over `workers` processes (at least one each)."""
    return max(1, torch.get_num_threads() // workers)


def run_tasks(worker_main: Callable, args: tuple, tasks: list, workers: int, on_done: Callable | None = None,
              poll_seconds: float = 5.0) -> None:
    """Run every task in `workers` processes; `on_done(task)` in this process as each one finishes.
    Raises RuntimeError naming the failed task (after the other workers finish what they hold) or the
    worker that exited without answering."""
    context = multiprocessing.get_context("spawn")
    todo, done = context.Queue(), context.Queue()
    for task in tasks:
        todo.put(task)
    workers = max(1, min(workers, len(tasks)))
    for _ in range(workers):
        todo.put(None)
    threads = threads_per_worker(workers)
    processes = [context.Process(target=worker_main, args=(*args, threads, todo, done), daemon=True)
                 for _ in range(workers)]
    for process in processes:
        process.start()
    failures, remaining = [], len(tasks)
    try:
        while remaining:
            try:
                task, error = done.get(timeout=poll_seconds)
            except queue.Empty:
                dead = [p for p in processes if not p.is_alive()]
                if len(dead) == len(processes) or any(p.exitcode not in (0, None) for p in dead):
                    codes = ", ".join(str(p.exitcode) for p in dead)
                    raise RuntimeError(f"a worker process exited (exit code {codes}) with {remaining} task(s) "
                                       "unanswered; what finished is saved, run again to continue") from None
                continue
            remaining -= 1
            if error is not None:
                failures.append(f"{task}: {error}")
                remaining -= _drain(todo)   # no new tasks; the others finish the one they hold
            elif on_done is not None:
                on_done(task)
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
    if failures:
        raise RuntimeError(f"{len(failures)} task(s) failed, the first: {failures[0]}")


def _drain(todo) -> int:
    """Take the not yet started tasks off the queue, leaving the workers' stop signals; how many it took."""
    stops = taken = 0
    while True:
        try:
            item = todo.get(timeout=0.5)       # get_nowait can miss items still in the feeder thread
        except queue.Empty:
            break
        stops, taken = stops + (item is None), taken + (item is not None)
    for _ in range(stops):
        todo.put(None)
    return taken
