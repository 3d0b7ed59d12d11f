"""`testbed.experiments.workers.run_tasks`: tasks pulled from a queue by spawned worker processes."""
import os

import pytest

from distalign.testbed.experiments.workers import run_tasks, threads_per_worker


def _echo_worker(log_dir: str, threads: int, todo, done) -> None:
    """Writes <task>.txt holding its pid and thread count for each task; task 'boom' fails, 'die' exits."""
    while (task := todo.get()) is not None:
        if task == "die":
            os._exit(3)
        try:
            if task == "boom":
                raise ValueError("row 'boom' has no data")
            with open(os.path.join(log_dir, f"{task}.txt"), "w") as handle:
                handle.write(f"{os.getpid()} {threads}")
            done.put((task, None))
        except Exception as error:  # noqa: BLE001 -- the worker protocol: report, do not die
            done.put((task, f"{type(error).__name__}: {error}"))


def test_every_task_runs_once_in_worker_processes(tmp_path):
    finished = []
    run_tasks(_echo_worker, (str(tmp_path),), ["a", "b", "c", "d", "e"], workers=2, on_done=finished.append)
    assert sorted(finished) == ["a", "b", "c", "d", "e"]
    pids = {(tmp_path / f"{t}.txt").read_text().split()[0] for t in finished}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
    assert {(tmp_path / f"{t}.txt").read_text().split()[1] for t in finished} == {str(threads_per_worker(2))}


def test_a_failed_task_is_named_and_the_finished_ones_are_kept(tmp_path):
    finished = []
    with pytest.raises(RuntimeError, match="boom: ValueError: row 'boom' has no data"):
        run_tasks(_echo_worker, (str(tmp_path),), ["a", "boom"], workers=1, on_done=finished.append)
    assert finished == ["a"] and (tmp_path / "a.txt").is_file()


def test_a_worker_that_dies_is_reported_not_waited_for(tmp_path):
    with pytest.raises(RuntimeError, match="exit code 3"):
        run_tasks(_echo_worker, (str(tmp_path),), ["die", "a"], workers=1, poll_seconds=0.5)


def test_threads_are_shared_out_at_least_one_each():
    import torch
    assert threads_per_worker(1) == torch.get_num_threads()
    assert threads_per_worker(10 * torch.get_num_threads()) == 1
