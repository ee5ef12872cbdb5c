"""How run_main ends a job: a job that finished leaves the process group (dist.shutdown) before the interpreter's
teardown, and a job that failed does not, since a peer may never reach the barrier shutdown waits at."""

from __future__ import annotations

import pytest

from ds_dynrank import dist
from ds_dynrank.errors import EXIT_PREEMPTED, NonFiniteLossError, Preempted, UserInputError
from ds_dynrank.task.job import run_main


def _ending(error: BaseException | None):
    def train(args):
        assert args.output_dir == "out"  # run_main parsed the job's own arguments
        if error is not None:
            raise error

    return train


@pytest.mark.parametrize(
    ("error", "code", "left"),
    [
        (None, 0, 1),
        (UserInputError("--dataset: file not found"), 2, 0),
        (NonFiniteLossError("loss is nan"), 3, 0),
        (Preempted("SIGTERM"), EXIT_PREEMPTED, 0),
    ],
)
def test_only_a_finished_job_leaves_the_process_group(error, code, left, monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "shutdown", lambda: calls.append("shutdown"))
    assert run_main(_ending(error), ["--output_dir", "out"], "test") == code
    assert len(calls) == left


def test_shutdown_without_a_process_group_is_a_no_op():
    assert not dist.is_initialized()
    dist.shutdown()
    assert not dist.is_initialized()
