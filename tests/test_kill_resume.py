"""kill -9 / resume on real subprocesses (tests/kill_resume.py): the killed and resumed run ends with the
uninterrupted run's final weights bit for bit, leaves no temp folder and logs no step twice. The in-process
crash / resume tests (test_resume_contract, test_training_offline, test_online_training) cover the same
resume paths faster; the full count of trials comes from `python tests/kill_resume.py --trials 20`."""
import random

import pytest
from kill_resume import reference_run, run_trial


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from kill_resume import build_workspace
    return build_workspace(tmp_path_factory.mktemp("kill_resume"))


def check(method, workspace, index, kills):
    trial = run_trial(method, workspace, index, reference_run(method, workspace), random.Random(0), kills)
    assert trial.kills == len(kills) and trial.equal and not trial.problems, trial
    return trial


def test_an_iterative_run_killed_inside_a_round_resumes_bitwise(workspace):
    """spin, rounds of 3 steps, killed once step 5 is logged: it resumes from checkpoint-4 or -5, inside
    round 2, whose samples and reference pi_t come back from that checkpoint."""
    trial = check("spin", workspace, 0, [("step", 5)])
    assert trial.resumes == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo", "online_dpo", "spac", "aihf"])
def test_killed_runs_of_every_family_resume_bitwise(workspace, method):
    check(method, workspace, 1, [("step", 2), ("step", 4)])
